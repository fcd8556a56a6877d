"""The run's side of its worker processes: start them, deal them the list's entries,
take back each entry's record, hand a dead worker's entries to the others, stop them.

No Scrapy here: the fetch spider builds a :class:`Crew` (fetcher.spiders.fetch) and
deals it its entries instead of downloading them; each comes back as its record.

- **Dealing.** An entry goes to the worker its *key* names (the hash of the file's
  name, so two URLs saved to one path meet in one worker, which answers "path
  conflict" exactly as one process does); a dead worker's keys go to one survivor
  each, so that stays true after a death. Entries travel on the worker's standard
  input (a worker is ``scrapy crawl fetch -a list=-``; fetcher.workers.channel).
- **Records.** A worker sends each entry's record once it is in the store
  (fetcher.extensions.WorkerReport), where it went through the item pipelines; the
  run reports it (summary, progress, feed, exit status) without writing it again.
- **Faults.** A worker that dies (``kill -9``) leaves its unfinished entries to
  the others (its ``.part`` files resume there; its path locks died with it). A
  worker that cannot start is an error of the run. Workers have sessions of their
  own, so one Ctrl-C reaches the run once and :meth:`stop` passes it on (SIGTERM); each
  worker also stops when the run dies (PR_SET_PDEATHSIG, set in the worker).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fetcher.items import FileRecord
from fetcher.listing.urllist import Entry
from fetcher.workers.channel import COALESCE, Frames, frame

logger = logging.getLogger(__name__)

_READ = 1 << 16
_EXIT_WAIT = 5.0  # seconds a worker that closed its channel gets to exit before it is killed
_FINISH_WAIT = 120.0  # seconds the workers get to close their records once their lists ended
#: Stats the run keeps itself (from the records it relays, its own list and log): a worker's are not added.
_RUN_OWN = ("start_time", "finish_time", "finish_reason", "elapsed_time_seconds", "item_", "log_count/",
            "memusage/startup", "fetcher/downloaded", "fetcher/uptodate", "fetcher/cached", "fetcher/failed",
            "fetcher/bytes", "fetcher/list", "fetcher/duplicates", "fetcher/active", "fetcher/retry_waiting")


class Stats(Protocol):
    def get_value(self, key: str, default: Any = None) -> Any: ...
    def set_value(self, key: str, value: Any) -> None: ...
    def inc_value(self, key: str, count: int = 1, start: int = 0) -> None: ...
    def max_value(self, key: str, value: Any) -> None: ...


#: The command line of worker *index* whose channel is file descriptor *fd*.
Command = Callable[[int, int], list[str]]


@dataclass(eq=False)
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    to_worker: int  # its standard input (the entries)
    from_worker: int  # its channel (records, progress, log lines, stats)
    frames: Frames = field(default_factory=Frames)
    pending: dict[str, Entry] = field(default_factory=dict)  # dealt, not yet recorded
    unsent: bytearray = field(default_factory=bytearray)
    ready: bool = False
    alive: bool = True
    progress: tuple[int, int, int] = (0, 0, 0)  # bytes received, transfers active, retries waiting


class Crew:
    """N worker processes downloading one list for one run."""

    def __init__(self, n: int, command: Command, *, env: dict[str, str], key: Callable[[Entry], int],
                 answered: Callable[[FileRecord], None], stats: Stats, failed: Callable[[str], None],
                 unwritten: Callable[[], None]) -> None:
        self.n = n
        self.command = command
        self.env = env
        self.key = key
        self.answered = answered  # each dealt entry's record, once
        self.stats = stats
        self.failed = failed  # the run cannot end well (a worker could not start, or none is left)
        self.unwritten = unwritten  # a worker could not write the store's records
        self.workers: list[_Worker] = []
        self.stopping = False
        self.finishing = False
        self.outstanding = 0  # entries dealt and not yet answered
        self._started = False
        self._loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        self._all_exited = asyncio.Event()

    def _start(self) -> None:
        for index in range(self.n):
            try:
                self.workers.append(self._spawn(index))
            except OSError as exc:
                self.failed(f"cannot start worker process {index + 1}: {exc}")
        logger.info("Downloading with %d worker processes (FETCHER_WORKERS)", len(self.workers))

    def _spawn(self, index: int) -> _Worker:
        read_end, write_end = os.pipe()
        try:
            proc = subprocess.Popen(
                self.command(index, write_end), stdin=subprocess.PIPE, pass_fds=(write_end,),
                env=self.env, start_new_session=True)
        finally:
            os.close(write_end)
        assert proc.stdin is not None
        to_worker = proc.stdin.fileno()
        os.set_blocking(to_worker, False)
        worker = _Worker(index, proc, to_worker, read_end)
        self._loop.add_reader(read_end, self._readable, worker)
        return worker

    # -- entries out, records back

    def deal(self, entry: Entry) -> None:
        """Have a worker fetch *entry*; its record comes back through ``answered``. The workers
        start with the first entry (an empty list starts none)."""
        if not self._started and not self.stopping:
            self._started = True
            self._start()
        self.outstanding += 1
        self._drained.clear()
        self._deal(entry)

    async def drained(self) -> None:
        """Until every entry dealt has its record."""
        while self.outstanding:
            await self._drained.wait()

    def _deal(self, entry: Entry) -> None:
        alive = [w for w in self.workers if w.alive]
        if not alive or self.stopping:
            why = ("the run was stopped before this file was fetched", "stopped") if self.stopping \
                else ("no worker process is left to fetch it", "worker lost")
            self._answer(FileRecord(entry, "failed", error=why[0], reason=why[1]))
            return
        key = self.key(entry)
        worker = self.workers[key % len(self.workers)]
        if not worker.alive:  # a dead worker's keys: each to one survivor, always the same
            worker = alive[key % len(alive)]
        worker.pending[entry.url] = entry
        self._write(worker, frame(entry))

    def _answer(self, record: FileRecord) -> None:
        self.outstanding -= 1
        if not self.outstanding:
            self._drained.set()
        self.answered(record)

    def _write(self, worker: _Worker, data: bytes) -> None:
        """Queue *data* for *worker*, written COALESCE seconds later with what follows it (a
        worker holds FETCHER_MAX_PENDING / N entries: it does not wait for these)."""
        if not worker.unsent:
            self._loop.call_later(COALESCE, self._flush, worker)
        worker.unsent += data

    def _flush(self, worker: _Worker) -> None:
        if worker.proc.stdin is None:  # closed: the worker ended
            return
        try:
            while worker.unsent:
                del worker.unsent[:os.write(worker.to_worker, worker.unsent)]
        except BlockingIOError:
            self._loop.add_writer(worker.to_worker, self._flush, worker)
            return
        except OSError:  # the worker is gone: its channel's end says so
            worker.unsent.clear()
        self._loop.remove_writer(worker.to_worker)
        if self.finishing:
            self._close_input(worker)

    def _readable(self, worker: _Worker) -> None:
        try:
            data = os.read(worker.from_worker, _READ)
        except OSError:
            data = b""
        if not data:
            self._exited(worker)
            return
        for message in worker.frames.feed(data):
            getattr(self, f"_on_{message[0]}")(worker, *message[1:])

    def _on_ready(self, worker: _Worker) -> None:
        worker.ready = True

    def _on_records(self, worker: _Worker, records: list[FileRecord]) -> None:
        for record in records:
            if worker.pending.pop(record.url, None) is not None:
                self._answer(record)

    def _on_progress(self, worker: _Worker, received: int, active: int, waiting: int) -> None:
        worker.progress = (received, active, waiting)
        self._report_progress()

    def _on_log(self, worker: _Worker, attributes: dict[str, Any]) -> None:
        """A worker's log record, through this process's handlers (and its record factory:
        the one redactor, again, fetcher.logs)."""
        record = logging.getLogRecordFactory()(
            attributes["name"], attributes["levelno"], attributes["pathname"], attributes["lineno"],
            attributes["msg"], None, None, attributes["funcName"])
        record.created = attributes["created"]
        record.msecs = attributes["created"] % 1 * 1000
        record.exc_text = attributes["exc_text"]
        logging.getLogger(record.name).handle(record)

    def _on_unwritten(self, worker: _Worker) -> None:
        self.unwritten()

    def _on_stats(self, worker: _Worker, stats: dict[str, Any]) -> None:
        """A worker's final stats, added into the run's (STATS_DUMP shows the sums)."""
        for key, value in stats.items():
            if key.startswith(_RUN_OWN) or isinstance(value, bool):
                continue
            if key.endswith("/max") or key.startswith("memusage/"):
                self.stats.max_value(key, value)
            elif isinstance(value, (int, float)):
                self.stats.inc_value(key, value)
            elif self.stats.get_value(key) is None:
                self.stats.set_value(key, value)

    def _report_progress(self) -> None:
        self.stats.set_value("fetcher/bytes_received", sum(w.progress[0] for w in self.workers))
        self.stats.set_value("fetcher/active", sum(w.progress[1] for w in self.workers if w.alive))
        self.stats.set_value("fetcher/retry_waiting", sum(w.progress[2] for w in self.workers if w.alive))

    # -- ends

    def _exited(self, worker: _Worker) -> None:
        self._loop.remove_reader(worker.from_worker)
        os.close(worker.from_worker)
        worker.unsent.clear()
        self._close_input(worker)  # and its writer (once closed, its number may be another file's)
        worker.alive = False
        try:
            code = worker.proc.wait(_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            code = worker.proc.wait()
        worker.progress = (worker.progress[0], 0, 0)
        self._report_progress()
        left, worker.pending = list(worker.pending.values()), {}
        if not worker.ready and not self.stopping:
            self.failed(f"worker process {worker.index + 1} could not start ({_exit_status(code)})")
        elif not any(w.alive for w in self.workers) and not self.stopping and not self.finishing:
            self.failed("no worker process is left to finish the list")
        elif left and not self.stopping:
            logger.error("Worker process %d (pid %d) ended (%s) with %d files unfinished; the other workers "
                         "take them over", worker.index + 1, worker.proc.pid, _exit_status(code), len(left))
        for entry in left:
            self._deal(entry)
        if not any(w.alive for w in self.workers):
            self._all_exited.set()

    def _close_input(self, worker: _Worker) -> None:
        if worker.proc.stdin is not None and not worker.unsent:
            self._loop.remove_writer(worker.to_worker)
            worker.proc.stdin.close()
            worker.proc.stdin = None

    def stop(self) -> None:
        """The run is stopping (Ctrl-C, a signal): every worker stops too, keeping its .part files.
        SIGTERM is Scrapy's graceful stop as SIGINT is, and it also ends a worker still starting
        (Python's default for SIGINT, KeyboardInterrupt, may be caught there)."""
        if self.stopping:
            return
        self.stopping = True
        for worker in self.workers:
            if worker.alive:
                worker.proc.send_signal(signal.SIGTERM)

    async def finish(self) -> None:
        """The list is done and every entry recorded: the workers' lists end, and they exit
        (their records closed) before the run closes the store's."""
        self.finishing = True
        for worker in self.workers:
            if worker.alive:
                self._close_input(worker)
        if not self.workers or not any(w.alive for w in self.workers):
            return
        try:
            await asyncio.wait_for(self._all_exited.wait(), _FINISH_WAIT)
        except TimeoutError:
            for worker in self.workers:
                if worker.alive:
                    logger.error("Worker process %d did not exit; killing it", worker.index + 1)
                    worker.proc.kill()
            await self._all_exited.wait()


def _exit_status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
