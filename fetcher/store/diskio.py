"""How a body's bytes reach the disk and its digests: inline, or, for a big body, on a worker
thread that writes them at their offset (``os.pwrite``) and hashes them (both let go of the GIL),
so that the event loop only receives; preallocation as aria2 does it; hashing a finished file.

No Scrapy here (fetcher.store.writer drives it).
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from concurrent import futures
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
#: ...but a free worker gets what was gathered once it is this much, and a worker whose batch is
#: written takes what was gathered meanwhile if it is this much: bytes reach the disk soon (a
#: kill -9 loses less than this besides the batch being written), in writes that are not too
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
    being gathered; the worker takes the gathered one itself once its batch is written, so it
    never waits for the reactor thread between batches. While a full one waits, ``backlog`` names
    what the reader should wait for before reading on (memory stays flat); a worker's OSError is
    raised by the next hand-over, ``backlog``, ``settle`` or ``drain``."""

    def __init__(self, algorithms: tuple[str, ...]) -> None:
        self.algorithms = algorithms
        self.objects = [hashlib.new(a) for a in algorithms]
        self.threaded = False
        self.fd: int | None = None
        self.at = 0
        # Shared with the worker, under _lock: what was gathered, and whether a worker runs this
        # body's batches (then it takes what is gathered when its batch is written).
        self._lock = threading.Lock()
        self._batch: list[bytes] = []
        self._batched = 0
        self._active = False
        self._taken: Future[None] | None = None  # a reader waits for the worker to take the gathered batch
        self._running: Future[None] | None = None  # the worker's run of batches; its error is this body's
        self._running_size = 0  # the batch the worker has

    def update(self, data: bytes) -> None:
        if not self.threaded:
            for h in self.objects:
                h.update(data)
            return
        _THREADED.add(self)
        with self._lock:
            self._batch.append(data)
            self._batched += len(data)
            batched, active = self._batched, self._active
        if not active and batched >= _EAGER:
            self._hand_over()  # the worker is free: the bytes go to the disk now, not once a whole batch came
        elif batched >= _GATHER_LIMIT:
            self._wait_taken()  # a caller that does not pause gathered all it may: wait, as bounded
        # Otherwise a worker runs this body and takes what is gathered once its batch is written.

    def backlog(self) -> Future[None] | None:
        """What the reader should wait for before reading on, or None: the worker taking this
        body's full gathered batch, or while all bodies together hold _HELD_LIMIT, this body's
        bytes written (every reader waits for its own: progress is certain). A full batch that
        no worker runs is handed over now, a worker's error raised."""
        spent = _spent()
        with self._lock:
            if self._active:
                if self._batched >= _HASH_BATCH:
                    return self._taken_future()
                return self._running if spent else None
            batched = self._batched
        if batched >= _HASH_BATCH or (spent and batched):
            self._hand_over()
            return self._running if spent else None
        self._wait()  # nothing to hand over: a worker's error still shows now
        return None

    def held(self) -> int:
        """This body's bytes not yet written: gathered, and the batch the worker has."""
        return self._batched + (self._running_size if self._active else 0)

    def settle(self) -> Future[None] | None:
        """``drain`` without its wait, one step at a time: the worker's run the caller should
        wait for before asking again, or None once every byte given is written and hashed (a
        worker's error raised)."""
        with self._lock:
            if self._active:
                assert self._running is not None
                return self._running
            batched = self._batched
        if batched:
            self._hand_over()
            return self._running
        self._wait()
        return None

    def drain(self) -> None:
        """Every byte given so far is in the digests once this returns."""
        while (running := self.settle()) is not None:
            futures.wait([running])

    def hexdigests(self) -> dict[str, str]:
        self.drain()
        return {a: h.hexdigest() for a, h in zip(self.algorithms, self.objects, strict=True)}

    def _hand_over(self) -> None:
        """Give what was gathered to a worker (none runs this body now)."""
        self._wait()  # the previous run first: its error is raised, not lost
        with self._lock:
            batch, at = self._take()
            self._active = True
        if not _WORKERS:
            _WORKERS.append(ThreadPoolExecutor(max_workers=2, thread_name_prefix="fetcher-body"))
        self._running = _WORKERS[0].submit(self._run, batch, at)

    def _take(self) -> tuple[list[bytes], int]:
        """Under _lock: the gathered batch and its offset, now the worker's."""
        batch, size, at = self._batch, self._batched, self.at
        self._batch, self._batched, self._running_size = [], 0, size
        self.at += size
        return batch, at

    def _run(self, batch: list[bytes], at: int) -> None:
        """On a worker thread: this batch, then each batch gathered meanwhile (at least _EAGER),
        until none is; a reader waiting for one to be taken is told."""
        taken = None
        try:
            while True:
                _update_all(self.objects, batch, self.fd, at)
                with self._lock:
                    taken, self._taken = self._taken, None
                    if self._batched < _EAGER:
                        self._active = False
                        return
                    batch, at = self._take()
                if taken is not None:
                    taken.set_result(None)
        except BaseException:
            with self._lock:
                self._active = False
                taken, self._taken = self._taken, None
            raise
        finally:
            if taken is not None and not taken.done():
                taken.set_result(None)  # the reader asks again, and finds the run's end (or error)

    def _taken_future(self) -> Future[None]:
        """Under _lock, while a worker runs: done once it took the gathered batch."""
        if self._taken is None:
            self._taken = Future()
        return self._taken

    def _wait_taken(self) -> None:
        with self._lock:
            pending = self._taken_future() if self._active else None
        if pending is None:
            self._hand_over()
        else:
            futures.wait([pending])
            self.backlog()  # a worker's error shows now

    def _wait(self) -> None:
        """The worker's last run, over: its error raised, once."""
        running, self._running = self._running, None
        if running is not None:
            running.result()


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
