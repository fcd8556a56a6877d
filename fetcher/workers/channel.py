"""Messages between a run and its worker processes: length-prefixed pickles on pipes. Pure.

The run deals entries on a worker's standard input; a worker sends records,
progress, log lines and stats on the pipe the run passed it. Only the run and
its own workers hold these pipes, so a message may be any picklable object.
The run reads without blocking (:class:`Frames` takes whatever bytes came); a
worker reads its entries in a thread (:func:`messages`), each as soon as it is
whole (the list format could not say an entry is complete before the next one).
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Iterator
from typing import Any

_HEADER = struct.Struct("!I")
_READ = 1 << 16
#: Seconds a message waits for others to go with it: each write wakes the other side, and a
#: message per file would cost two context switches a file.
COALESCE = 0.005


def frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def send(fd: int, message: Any) -> None:
    """Write one message to *fd* (a blocking pipe); BrokenPipeError when the run is gone."""
    view = memoryview(frame(message))
    while view:
        view = view[os.write(fd, view):]


def messages(fd: int) -> Iterator[Any]:
    """Every message on *fd* until its end, each as soon as it is whole (blocking: in a thread)."""
    frames = Frames()
    while data := os.read(fd, _READ):
        yield from frames.feed(data)


class Frames:
    """Whole messages out of the bytes read so far."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        messages = []
        start = 0
        while len(self._buffer) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer, start)
            end = start + _HEADER.size + size
            if len(self._buffer) < end:
                break
            messages.append(pickle.loads(self._buffer[start + _HEADER.size:end]))
            start = end
        del self._buffer[:start]
        return messages
