"""Retry policy for streamed files: what to do after each attempt.

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
  ``FETCHER_RETRY_AFTER_MAX`` (fetcher/backoff.py).

Each error names its own short reason (the summary groups failures by it) with
a ``reason`` class attribute; :func:`classify` is the one place that turns an
attempt into an :class:`Action`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scrapy.exceptions import StopDownload
from scrapy.utils.misc import load_object

from fetcher.handlers import STOPPED_FLAG

if TYPE_CHECKING:
    from scrapy.settings import BaseSettings

#: HttpCacheMiddleware's flag on a response it answered: the body is in memory.
CACHED_FLAG = "cached"


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
    streamed: bool = False  # the body went to the writer
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


def reason_of(exc: BaseException) -> str:
    """An error's short reason: its class's ``reason``, else its class name."""
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
        in_memory = CACHED_FLAG in attempt.flags
        if 200 <= status < 300 and not (attempt.streamed or in_memory):
            return Verdict(Action.GIVE_UP, "not streamed",
                           f"HTTP {status} but the body was not streamed: DOWNLOAD_HANDLERS must map this scheme "
                           "to fetcher.handlers.StreamingDownloadHandler")
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
