"""How a body's bytes reach the disk and its digests: inline, or, for a big body, on a worker
thread that writes them at their offset (``os.pwrite``) and hashes them (both let go of the GIL),
so that the event loop only receives; preallocation as aria2 does it; hashing a finished file.

No Scrapy here (fetcher.store.writer drives it).
"""

from __future__ import annotations

import hashlib
import os
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, BinaryIO

from fetcher.store.files import open_file

if TYPE_CHECKING:
    from pathlib import Path

_READ_CHUNK = 1 << 20
#: A big body's bytes go to the worker in batches of up to this many, gathered while it is busy:
#: one batch written and one gathered per body (memory stays flat: the reader pauses its socket
#: while a full one waits)...
_HASH_BATCH = 1 << 20
#: ...but a free worker gets what was gathered once it is this much: bytes reach the disk soon
#: (a kill -9 loses less than this besides the batch being written), in writes that are not too
#: small (on 200 x 4 MiB: 2.6 s with 256 KiB, 2.9 s handing over every 64 KiB read).
_EAGER = 256 * 1024
#: A caller that never asks for the ``backlog`` (so never pauses) is made to wait for the worker
#: once this much is gathered: the bound holds whoever feeds the bytes.
_GATHER_LIMIT = 4 * _HASH_BATCH
#: A big body's bytes not yet written (gathered, or handed over), all bodies together: past it
#: every reader waits for its own batch before reading on. The reactor thread never waits for
#: the workers, so without it 64 bodies' batches piled up (200 x 4 MiB: peak RSS 150-210 MiB).
_HELD_LIMIT = 8 << 20
_THREADED: weakref.WeakSet[Hashes] = weakref.WeakSet()  # the bodies whose bytes go to a worker
_WORKERS: list[ThreadPoolExecutor] = []  # made on first use


class Hashes:
    """A body's digests, updated inline, or for a big body (``threaded``) on a worker thread that
    also writes its bytes (at ``fd``, from offset ``at``): the reactor thread only receives, and
    never waits for the worker while bytes flow. In order, with one batch being written and one
    being gathered: while a full one waits, ``backlog`` names the batch it waits for, so that the
    reader pauses its socket (memory stays flat); a worker's OSError is raised by the next
    hand-over, ``backlog`` or ``drain``."""

    def __init__(self, algorithms: tuple[str, ...]) -> None:
        self.algorithms = algorithms
        self.objects = [hashlib.new(a) for a in algorithms]
        self.threaded = False
        self._batch: list[bytes] = []
        self._batched = 0
        self._running: Future[None] | None = None
        self._running_size = 0
        self.fd: int | None = None
        self.at = 0

    def update(self, data: bytes) -> None:
        if not self.threaded:
            for h in self.objects:
                h.update(data)
            return
        _THREADED.add(self)
        self._batch.append(data)
        self._batched += len(data)
        running = self._running
        free = running is None or running.done()
        if self._batched >= _GATHER_LIMIT or (free and self._batched >= _EAGER):
            # The worker is free (the bytes go to the disk now, not once a whole batch came), or
            # a caller that does not pause gathered all it may: wait, as bounded.
            self._hand_over()
        elif self._batched >= _HASH_BATCH:
            self.backlog()

    def backlog(self) -> Future[None] | None:
        """The worker's batch a full one waits behind, or that this body's bytes wait for while
        all bodies together hold _HELD_LIMIT (the caller should pause until it is done), or None:
        a full batch whose turn came is handed over now, a worker's error raised."""
        running = self._running
        spent = _spent()  # then every body waits for its own batch: progress is certain
        if running is not None and not running.done():
            return running if self._batched >= _HASH_BATCH or spent else None
        if self._batched >= _HASH_BATCH or (spent and self._batched):
            self._hand_over()  # the previous batch is done: no wait, and its error raised
            return self._running if spent else None
        if running is not None:
            self._wait()  # nothing to hand over: a worker's error still shows now
        return None

    def held(self) -> int:
        """This body's bytes not yet written: gathered, and the batch the worker has."""
        running = self._running
        return self._batched + (self._running_size if running is not None and not running.done() else 0)

    def settle(self) -> Future[None] | None:
        """``drain`` without its wait, one step at a time: the worker's batch the caller should
        wait for before asking again, or None once every byte given is written and hashed (a
        worker's error raised)."""
        running = self._running
        if running is not None and not running.done():
            return running
        if self._batch:
            self._hand_over()  # the batch before it is done: no wait, and its error raised
            return self._running
        self._wait()
        return None

    def _hand_over(self) -> None:
        self._wait()  # the previous batch first: the digest is of the bytes in order
        batch, size, self._batch, self._batched = self._batch, self._batched, [], 0
        if not _WORKERS:
            _WORKERS.append(ThreadPoolExecutor(max_workers=2, thread_name_prefix="fetcher-body"))
        self._running = _WORKERS[0].submit(_update_all, self.objects, batch, self.fd, self.at)
        self._running_size = size
        self.at += size

    def _wait(self) -> None:
        running, self._running = self._running, None
        if running is not None:
            running.result()

    def drain(self) -> None:
        """Every byte given so far is in the digests once this returns."""
        if self._batch:
            self._hand_over()
        self._wait()

    def hexdigests(self) -> dict[str, str]:
        self.drain()
        return {a: h.hexdigest() for a, h in zip(self.algorithms, self.objects, strict=True)}


def _spent() -> bool:
    """Whether the big bodies' bytes not yet written reach _HELD_LIMIT."""
    return sum(h.held() for h in list(_THREADED)) >= _HELD_LIMIT


def _update_all(hashes: list[Any], batch: list[bytes], fd: int | None, at: int) -> None:
    """On a worker thread: the joined batch written at *at* (when *fd*), then one update per
    hash (the GIL is let go during both)."""
    data = b"".join(batch)
    if fd is not None:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, at)
            view, at = view[n:], at + n
    for h in hashes:
        h.update(data)


def allocate(fd: int, start: int, end: int, how: str) -> None:
    """Give the file at *fd* its bytes from *start* to *end* as aria2's --file-allocation does."""
    if end <= start or how == "none":
        return
    if how == "falloc":
        os.posix_fallocate(fd, start, end - start)
    elif how == "trunc":
        os.ftruncate(fd, end)
    else:  # "prealloc": zeros written over the rest, for filesystems without fallocate
        zeros = bytes(_READ_CHUNK)
        for at in range(start, end, _READ_CHUNK):
            os.pwrite(fd, zeros[: min(_READ_CHUNK, end - at)], at)


def hash_file(path: Path, algorithms: tuple[str, ...]) -> tuple[int, dict[str, str]]:
    """Size and digests of a finished file (for files found complete on disk)."""
    hashes = [hashlib.new(a) for a in algorithms]
    with open_file(path, "rb") as f:
        size = hash_into(f, hashes)
    return size, {a: h.hexdigest() for a, h in zip(algorithms, hashes, strict=True)}


def hash_into(f: BinaryIO, hashes: list[Any], limit: int | None = None) -> int:
    """Feed *f* (up to *limit* bytes) to every hash; return how many bytes were read."""
    done = 0
    while limit is None or done < limit:
        chunk = f.read(_READ_CHUNK if limit is None else min(_READ_CHUNK, limit - done))
        if not chunk:
            break
        done += len(chunk)
        for h in hashes:
            h.update(chunk)
    return done
