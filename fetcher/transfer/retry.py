"""Retries: what to do after each attempt, and the one way fetcher waits for another.

fetcher retries streamed files itself rather than through Scrapy's
RetryMiddleware (each attempt carries ``dont_retry``), so that a file waiting out
its backoff holds no concurrency slot and a retry resumes the bytes already kept.
It reads the same settings, and the same request meta, as
``scrapy/downloadermiddlewares/retry.py``:

* ``RETRY_ENABLED``, ``RETRY_TIMES``: retries after the first attempt;
* ``RETRY_HTTP_CODES``: statuses worth another attempt;
* ``RETRY_EXCEPTIONS``: errors worth another attempt;
* request meta ``max_retry_times`` (wins over RETRY_TIMES) and ``dont_retry``;
* how long to wait: ``FETCHER_BACKOFF_BASE``, ``FETCHER_BACKOFF_MAX``,
  ``FETCHER_RETRY_AFTER_MAX`` (fetcher/transfer/backoff.py).

Each error names its own short reason (the summary groups failures by it) with
a ``reason`` class attribute; :meth:`RetryPolicy.classify` is the one place that
turns an attempt into an :class:`Action`, and :class:`Retrier` is the one helper
every retrying loop goes through (a file's attempts, a segment's, an upload's, a
list download's): one backoff, Retry-After honoured, Scrapy's retry stats, and
one way to stop waiting when the run ends.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scrapy.exceptions import IgnoreRequest, StopDownload
from scrapy.utils.misc import load_object
from scrapy.utils.python import global_object_name
from scrapy.utils.response import response_status_message

from fetcher._scrapy_private import spider_closing
from fetcher.config import Config
from fetcher.contract import STOPPED_FLAG

if TYPE_CHECKING:
    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings
    from scrapy.statscollectors import StatsCollector

    from fetcher.transfer.backoff import Backoff

logger = logging.getLogger(__name__)

_STOP_POLL = 0.5  # seconds: how soon a backoff notices that the run is being stopped


class Action(enum.Enum):
    """What to do after an attempt."""

    DONE = "done"  # the body is complete: verify it and put it in the store
    RETRY = "retry"  # try again after a backoff (counted against the retries)
    GIVE_UP = "give up"  # the file fails now
    START_OVER = "start over"  # the kept bytes cannot be continued: drop them and ask again at once
    CHECK_END = "check end"  # the body may be whole: ask at once for the bytes after it


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one attempt gave: an error, or a response and what the writer made of it."""

    error: BaseException | None = None
    status: int | None = None
    streamed: bool = False  # the body went to the writer (else it is in memory: the HTTP cache, another handler)
    flags: frozenset[str] = frozenset()
    resumed: bool = False  # the request asked for the rest of a kept .part
    part_complete: bool = False  # a 416 that names the kept .part's length as the whole file's
    unverified_end: bool = False  # ended with the connection, no length to check, ranges taken
    retry_after: float | None = None  # the server's Retry-After, in seconds


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reason: str = ""  # the short category the summary groups failures by
    message: str = ""  # what the record's error says
    keep_part: bool = True  # whether the bytes received so far are kept for a resume
    retry_after: float | None = None


_STOPPED = Verdict(Action.GIVE_UP, "stopped by StopDownload",
                   "stopped by StopDownload (a headers_received or bytes_received handler)", keep_part=False)


#: The reason of a request a downloader middleware dropped (IgnoreRequest: offsite, robots.txt...).
FILTERED = "filtered"


def reason_of(exc: BaseException) -> str:
    """An error's short reason: its class's ``reason``, else its class name (a request
    a middleware dropped without one of its own: "filtered")."""
    if isinstance(exc, IgnoreRequest) and not getattr(exc, "reason", None):
        return FILTERED
    return getattr(exc, "reason", None) or type(exc).__name__


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """RETRY_* settings, and the decision for each attempt."""

    times: int = 2
    http_codes: frozenset[int] = frozenset()
    exceptions: tuple[type[BaseException], ...] = ()

    @classmethod
    def from_settings(cls, settings: BaseSettings) -> RetryPolicy:
        return cls(
            times=settings.getint("RETRY_TIMES") if settings.getbool("RETRY_ENABLED") else 0,
            http_codes=frozenset(int(c) for c in settings.getlist("RETRY_HTTP_CODES")),
            exceptions=tuple(load_object(x) if isinstance(x, str) else x for x in settings.getlist("RETRY_EXCEPTIONS")),
        )

    def times_for(self, meta: dict[str, Any]) -> int:
        """Retries allowed for one request: ``dont_retry`` and ``max_retry_times`` as Scrapy reads them."""
        if meta.get("dont_retry"):
            return 0
        return int(meta.get("max_retry_times", self.times))

    def classify(self, attempt: Attempt) -> Verdict:
        """The one decision after an attempt; pure, so it is tested as a table."""
        if attempt.error is not None:
            return self._classify_error(attempt.error)
        status = attempt.status or 0
        if STOPPED_FLAG in attempt.flags:
            return _STOPPED
        if attempt.part_complete:
            return Verdict(Action.DONE)
        if status == 416 and attempt.resumed:
            return Verdict(Action.START_OVER, "bad resume", "the server refused to resume (HTTP 416)",
                           keep_part=False)
        if not (200 <= status < 300):
            action = Action.RETRY if status in self.http_codes else Action.GIVE_UP
            return Verdict(action, f"HTTP {status}", f"HTTP {status}", retry_after=attempt.retry_after)
        if attempt.unverified_end:
            return Verdict(Action.CHECK_END, "unverified end", "the body ended with the connection and no length")
        return Verdict(Action.DONE)

    def _classify_error(self, exc: BaseException) -> Verdict:
        if isinstance(exc, StopDownload):  # StopDownload(fail=True): as the flag of fail=False
            return _STOPPED
        retryable = getattr(exc, "retryable", None)  # the writer's errors say it themselves...
        if retryable is None:
            retryable, keep_part = isinstance(exc, self.exceptions), True
        else:  # ...and whether what they received can still be continued
            keep_part = retryable and getattr(exc, "keeps_part", True)
        return Verdict(Action.RETRY if retryable else Action.GIVE_UP, reason_of(exc),
                       str(exc) or type(exc).__name__, keep_part=keep_part)


class AttemptFailed(Exception):
    """One attempt's end that is not a finished file: what the policy decided, or the
    caller's own reason to give up (a checksum mismatch, a stopped run)."""

    def __init__(self, message: str, *, reason: str, retryable: bool, http_status: int | None = None,
                 retry_after: float | None = None, keep_part: bool = True, free: bool = False) -> None:
        super().__init__(message)
        self.free = free  # a check, not a failure: asked again at once, not counted as a retry
        self.reason = reason
        self.retryable = retryable
        self.http_status = http_status
        self.retry_after = retry_after
        self.keep_part = keep_part

    @classmethod
    def of(cls, verdict: Verdict, http_status: int | None = None) -> AttemptFailed:
        return cls(verdict.message, reason=verdict.reason, retryable=verdict.action is not Action.GIVE_UP,
                   http_status=http_status, retry_after=verdict.retry_after, keep_part=verdict.keep_part,
                   free=verdict.action in (Action.START_OVER, Action.CHECK_END))

    @classmethod
    def stopped(cls, message: str) -> AttemptFailed:
        return cls(message, reason="stopped", retryable=False)

    @property
    def stats_reason(self) -> str:
        """The reason in Scrapy's ``retry/reason_count/*`` stats: the exception's
        class path, or ``503 Service Unavailable`` for an HTTP status."""
        if self.__cause__ is not None:
            return global_object_name(type(self.__cause__))
        if self.http_status is not None and self.reason.startswith("HTTP"):
            return response_status_message(self.http_status)
        return self.reason


class Retrier:
    """The one retry helper: after a failed attempt, decide whether another may
    follow and wait for it.

    Limits are the caller's (a file's attempts: RETRY_TIMES or meta
    ``max_retry_times``, plus its mirrors; a segment's, counted per segment; an
    upload's and a list download's, RETRY_TIMES); everything else is the same
    for every loop: the backoff (FETCHER_BACKOFF_*, a server's Retry-After
    honoured), the stats Scrapy's RetryMiddleware keeps (``retry/count``,
    ``retry/reason_count/<reason>``, ``retry/max_reached``),
    ``fetcher/retry_waiting`` while it waits, and a wait that ends as soon as
    the run is being stopped (Ctrl-C, CLOSESPIDER_*)."""

    def __init__(self, policy: RetryPolicy, backoff: Backoff, stats: StatsCollector | None,
                 stopping: Callable[[], bool]) -> None:
        self.policy = policy
        self.backoff = backoff
        self.stats = stats  # None outside a crawl (scrapy enqueue): nothing to report to
        self.stopping = stopping  # whether the run is ending: no more waiting, no more attempts

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Retrier:
        return cls(RetryPolicy.from_settings(crawler.settings), Config.of(crawler).backoff, crawler.stats,
                   lambda: spider_closing(crawler))

    @classmethod
    def from_settings(cls, settings: BaseSettings) -> Retrier:
        """For work outside a crawl: the same policy and backoff, no stats, never stopped."""
        return cls(RetryPolicy.from_settings(settings), Config.from_settings(settings).backoff, None, lambda: False)

    @property
    def times(self) -> int:
        """Retries after the first attempt (RETRY_TIMES; 0 with RETRY_ENABLED=False)."""
        return self.policy.times

    async def again(self, failed: AttemptFailed, retries: int, times: int, what: str) -> bool:
        """After the failed attempt that follows *retries* earlier retries of *what*, with at
        most *times* retries allowed: True once the backoff is waited out and another
        attempt may go; False when *failed* is final, the limit is reached, or the run stops."""
        if not failed.retryable or self.stopping():
            return False
        if retries >= times:
            self._count("retry/max_reached")
            return False
        delay = self.backoff.delay(retries + 1, failed.retry_after)
        logger.debug("Retrying %s in %.1f s (attempt %d of %d): %s", what, delay, retries + 2, times + 1, failed)
        self._count("retry/count")
        self._count(f"retry/reason_count/{failed.stats_reason}")
        self._count("fetcher/retry_waiting")
        try:
            await self.wait(delay)
        finally:
            self._count("fetcher/retry_waiting", -1)
        return not self.stopping()

    def _count(self, key: str, n: int = 1) -> None:
        if self.stats is not None:
            self.stats.inc_value(key, n)

    async def wait(self, delay: float) -> None:
        """Sleep out *delay*, but wake up when the run is being stopped."""
        deadline = time.monotonic() + delay
        while not self.stopping() and (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, _STOP_POLL))
