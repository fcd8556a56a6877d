"""Extensions that report how a run went, fed by ``fetcher.signals.file_finished``:
the progress display, and the counts, stats and summary; and in a worker process,
the report to its run (WorkerReport). (The records, the manifest and failed.txt
are the store's: see ``fetcher.store.records``.)"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from typing import IO, TYPE_CHECKING, Any

from scrapy import signals
from scrapy.exceptions import NotConfigured
from twisted.internet.task import LoopingCall

from fetcher import signals as fetcher_signals
from fetcher.config import Config
from fetcher.redact import redact, safe_url
from fetcher.units import human_bytes
from fetcher.workers import channel

if TYPE_CHECKING:
    from collections.abc import Callable

    from scrapy.crawler import Crawler

    from fetcher.items import FileRecord

logger = logging.getLogger(__name__)

_EXAMPLES = 3  # example URLs per failure reason in the summary
_MEASURABLE = 256 * 1024  # bytes per file under which a per-file rate measures latency, not the host


class Summary:
    """Counts every ending into the stats (``fetcher/<status>``, a report) and logs
    a summary a person can read at a glance when the run ends."""

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self.stats = crawler.stats
        self.started = time.monotonic()
        self.counts: Counter[str] = Counter()
        self.received = 0
        self.host_bytes: Counter[str] = Counter()
        self.host_time: defaultdict[str, float] = defaultdict(float)
        self.host_files: Counter[str] = Counter()
        self.failures: dict[str, list[str]] = {}
        self.failure_counts: Counter[str] = Counter()
        crawler.signals.connect(self.opened, signal=signals.spider_opened)
        crawler.signals.connect(self.record, signal=fetcher_signals.file_finished)
        crawler.signals.connect(self.closed, signal=signals.spider_closed)
        crawler.signals.connect(self.stopped, signal=signals.engine_stopped)
        self._reason: str | None = None

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Summary:
        Config.of(crawler)  # built before the engine: a bad FETCHER_* setting stops the run here
        return cls(crawler)

    def opened(self) -> None:
        self.started = time.monotonic()

    def record(self, record: FileRecord) -> None:
        self.counts[record.status] += 1
        self.stats.inc_value(f"fetcher/{record.status}")
        self.received += record.received
        self.stats.inc_value("fetcher/bytes", record.received)
        if record.status == "downloaded":
            host = record.host  # a urlsplit: once per file
            self.host_bytes[host] += record.received
            self.host_time[host] += record.elapsed
            self.host_files[host] += 1
        elif record.status == "failed":
            reason = record.reason or "failed"
            self.failure_counts[reason] += 1
            examples = self.failures.setdefault(reason, [])
            if len(examples) < _EXAMPLES:
                examples.append(safe_url(record.url))

    def closed(self, reason: str) -> None:
        self._reason = reason

    def stopped(self) -> None:
        """Said once the spider's closing is over: a stopped run's worker processes report
        their last records while it closes."""
        if self._reason is not None and Config.of(self.crawler).worker_channel is None:  # a worker's run says it
            logger.info("%s", self.text(self._reason))

    def text(self, reason: str = "finished") -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        total = sum(self.counts.values())
        lines = [
            f"fetcher summary: {_plural(total, 'URL')} in {elapsed:.1f} s: "
            f"{self.counts['downloaded']} downloaded, {self.counts['uptodate']} up to date, "
            + (f"{self.counts['cached']} from the HTTP cache, " if self.counts["cached"] else "")
            + f"{self.counts['failed']} failed" + ("" if reason == "finished" else f" (run ended: {reason})"),
            f"  received {human_bytes(self.received)} at {human_bytes(self.received / elapsed)}/s",
        ]
        measurable = [h for h in self.host_files if self.host_bytes[h] >= _MEASURABLE * self.host_files[h]]
        slow = sorted((self.host_bytes[h] / max(self.host_time[h], 1e-9), h) for h in measurable)[:3]
        if len(measurable) > 1:  # one host, or tiny files, would say nothing
            lines.append("  slowest hosts: " + ", ".join(
                f"{h} ({human_bytes(rate)}/s per file, {_plural(self.host_files[h], 'file')})" for rate, h in slow
            ))
        if self.failure_counts:
            lines.append("  failures:")
            for why, n in self.failure_counts.most_common():
                more = " ..." if n > len(self.failures[why]) else ""
                lines.append(f"    {n} × {why}: " + ", ".join(self.failures[why]) + more)
        return "\n".join(lines)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class Progress:
    """Shows the run moving: a live bar on an interactive terminal, plain log
    lines otherwise (Scrapyd, CI, a pipe), with the same figures: files done of
    the total (known once the list is read), bytes, current rate, ETA, active
    transfers, retries waiting and failures so far.

    FETCHER_PROGRESS: ``auto`` (bar on a terminal, else lines), ``bar``, ``log`` or
    ``off``; FETCHER_PROGRESS_INTERVAL: seconds between log lines.
    """

    _BAR_REFRESH = 0.5  # seconds

    def __init__(self, crawler: Crawler, mode: str, interval: float) -> None:
        self.crawler = crawler
        self.stats = crawler.stats
        self.mode = mode
        self.interval = interval if mode == "log" else self._BAR_REFRESH
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._rate = 0.0
        self._last = (time.monotonic(), 0)
        self._bar: Any = None
        self._exit = contextlib.ExitStack()
        self._loop = LoopingCall(self.tick)
        crawler.signals.connect(self.opened, signal=signals.spider_opened)
        crawler.signals.connect(self.record, signal=fetcher_signals.file_finished)
        crawler.signals.connect(self.closed, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Progress:
        config = Config.of(crawler)
        mode = config.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() and crawler.settings.get("LOG_FILE") is None else "log"
        if mode == "off":
            raise NotConfigured("FETCHER_PROGRESS is off")
        return cls(crawler, mode, config.progress_interval)

    def opened(self) -> None:
        self.started = time.monotonic()
        if self.mode == "bar":
            # Imported for a bar only: 7 ms of every start, workers' and log mode's too.
            from tqdm import tqdm

            # tqdm keeps log lines above the bar; the line itself is fitted to the terminal here.
            self._bar = tqdm(file=sys.stderr, leave=True, bar_format="{desc}")
            # Scrapy's log lines go above the bar instead of through it.
            for handler in logging.root.handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.stdout):
                    old = handler.setStream(_AboveTheBar(handler.stream, tqdm.write))
                    self._exit.callback(handler.setStream, old)
        self._loop.start(self.interval, now=False)

    def record(self, record: FileRecord) -> None:
        self.done += 1
        self.failed += record.status == "failed"

    def figures(self) -> dict[str, Any]:
        now = time.monotonic()
        received = self.stats.get_value("fetcher/bytes_received", 0)
        then, before = self._last
        if now > then:
            instant = (received - before) / (now - then)
            self._rate = instant if not self._rate else 0.7 * self._rate + 0.3 * instant
        self._last = (now, received)
        if self.stats.get_value("fetcher/list_complete"):
            total = self.stats.get_value("fetcher/listed", 0)
        else:  # counted ahead from the list file, while it is being read
            total = self.stats.get_value("fetcher/list_counted")
        elapsed = now - self.started
        eta = None
        if total and self.done and total > self.done:
            eta = (total - self.done) * elapsed / self.done
        return {
            "done": self.done, "total": total, "received": received, "rate": self._rate, "eta": eta,
            "active": self.stats.get_value("fetcher/active", 0),
            "waiting": self.stats.get_value("fetcher/retry_waiting", 0), "failed": self.failed,
        }

    def tick(self) -> None:
        f = self.figures()
        if self._bar is not None:
            self._bar.set_description_str(progress_line(f, _terminal_width()), refresh=False)
            self._bar.refresh()
            return
        detail = (f"{human_bytes(f['received'])}, {human_bytes(f['rate'])}/s, {f['active']} active, "
                  f"{f['waiting']} retries waiting, {f['failed']} failed")
        eta = "" if f["eta"] is None else f", ETA {_clock(f['eta'])}"
        total = "?" if f["total"] is None else str(f["total"])
        logger.info("Progress: %d/%s files, %s%s", f["done"], total, detail, eta)

    def closed(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._bar is not None:
            self.tick()
            self._bar.close()
        self._exit.close()


#: How the bar line shrinks on a narrow terminal, least useful part first.
_SHRINK = ("waiting", "active", "narrow bar", "bytes", "no bar", "rate", "eta")


def progress_line(f: dict[str, Any], width: int) -> str:
    """The progress bar's line, fitted to *width* columns by dropping its least
    useful parts first; the files done and the failures count always stay."""
    total = "?" if f["total"] is None else str(f["total"])
    shown: dict[str, str] = {
        "bytes": human_bytes(f["received"]),
        "rate": f"{human_bytes(f['rate'])}/s",
        "active": f"{f['active']} active",
        "waiting": f"{f['waiting']} retries waiting",
        "failed": f"{f['failed']} failed",
    }
    if f["eta"] is not None:
        shown["eta"] = f"ETA {_clock(f['eta'])}"
    fraction = min(1.0, f["done"] / f["total"]) if f["total"] else 0.0
    bar_width = 20
    line = ""
    for step in (None, *_SHRINK):
        if step == "narrow bar":
            bar_width = 10
        elif step == "no bar":
            bar_width = 0
        elif step is not None:
            shown.pop(step, None)
        bar = f" |{_bar(fraction, bar_width)}|" if bar_width else ""
        line = f"fetcher {f['done']}/{total} files{bar} " + ", ".join(shown.values())
        if len(line) < width:
            break
    return line


def _bar(fraction: float, width: int) -> str:
    full = int(fraction * width)
    return ("█" * full).ljust(width)


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return shutil.get_terminal_size().columns


class _AboveTheBar:
    """A log handler's stream that prints each record above the progress bar."""

    def __init__(self, stream: IO[str], above: Callable[..., None]) -> None:
        self.stream = stream
        self.above = above  # tqdm.write

    def write(self, text: str) -> None:
        self.above(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class WorkerReport:
    """A worker process's side of its run (fetcher.workers.crew): each record once it is
    in the store, the progress figures, its log lines and its final stats go to the run
    over the channel the run gave it (FETCHER_WORKER_CHANNEL). Only in a worker.

    A worker ends with its run: the kernel sends it SIGTERM when the run dies
    (PR_SET_PDEATHSIG), and a run that went away before that was set is noticed at once."""

    _TICK = 0.5  # seconds between progress figures

    def __init__(self, crawler: Crawler, fd: int, run: int) -> None:
        self.crawler = crawler
        self.stats = crawler.stats
        self.fd = fd
        self._lock = threading.Lock()  # log lines come from threads too: one message at a time
        self._records: list[FileRecord] = []
        self._last: tuple[int, int, int] | None = None
        self._gone = False
        self._loop = LoopingCall(self.tick)
        _end_with(run)
        handler = _ToRun(self, crawler.settings.get("LOG_LEVEL"))
        logging.root.addHandler(handler)
        crawler.signals.connect(self.opened, signal=signals.spider_opened)
        crawler.signals.connect(self.record, signal=fetcher_signals.file_finished)
        crawler.signals.connect(self.unwritten, signal=fetcher_signals.records_unwritten)
        crawler.signals.connect(self.closed, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> WorkerReport:
        run = Config.of(crawler).worker_channel
        if run is None:
            raise NotConfigured  # no reason: Scrapy says nothing of an extension that is not for this process
        return cls(crawler, run.fd, run.run_pid)

    def send(self, *message: Any) -> None:
        with self._lock:
            if self._gone:
                return
            try:
                channel.send(self.fd, message)
            except OSError:  # the run is gone: stop as a Ctrl-C would
                self._gone = True
                os.kill(os.getpid(), signal.SIGTERM)

    def opened(self) -> None:
        self.send("ready")
        self._loop.start(self._TICK, now=False)

    def record(self, record: FileRecord) -> None:
        """Sent a little later (with the others of the next few ms: each message wakes the run):
        after every handler of this signal, the store's records among them, has run (the record
        is in the store; its manifest line is made)."""
        if not self._records:
            asyncio.get_running_loop().call_later(channel.COALESCE, self._send_records)
        self._records.append(record)

    def _send_records(self) -> None:
        records, self._records = self._records, []
        self.tick()  # the bytes before the records: the run's progress never counts a file without them
        self.send("records", [dataclasses.replace(r, response=None) for r in records])

    def unwritten(self) -> None:
        self.send("unwritten")

    def tick(self) -> None:
        figures = (self.stats.get_value("fetcher/bytes_received", 0), self.stats.get_value("fetcher/active", 0),
                   self.stats.get_value("fetcher/retry_waiting", 0))
        if figures != self._last:
            self._last = figures
            self.send("progress", *figures)

    def closed(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._records:
            self._send_records()
        self.tick()
        self.send("stats", self.stats.get_stats())


def _end_with(run: int) -> None:
    """SIGTERM (a graceful stop) when the run process dies, even by kill -9 (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != run:  # it died before that was set
        os.kill(os.getpid(), signal.SIGTERM)


class _ToRun(logging.Handler):
    """A worker's log records, to its run's log (formatted there, so there is one log
    and no line is interleaved with another). Scrapy's own chatter below WARNING (each
    worker's "Spider opened") stays in the worker."""

    def __init__(self, report: WorkerReport, level: str | int) -> None:
        super().__init__(level)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and record.name.startswith(("scrapy", "twisted", "py.warnings")):
            return
        try:
            attributes = {"name": record.name, "levelno": record.levelno, "msg": record.getMessage(),
                          "created": record.created, "pathname": record.pathname, "lineno": record.lineno,
                          "funcName": record.funcName,
                          # redacted already when the record was made (fetcher.logs); else here
                          "exc_text": record.exc_text or (redact(_FORMAT.formatException(record.exc_info))
                                                          if record.exc_info else None)}
            self.report.send("log", attributes)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


_FORMAT = logging.Formatter()
