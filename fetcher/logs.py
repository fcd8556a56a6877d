"""Log output: every log record of the process, Scrapy's and every library's included, leaves
through fetcher's one redactor (fetcher/redact.py): its message, its traceback and its stack.

A log record factory does it, installed once per process by the add-on (and by fetcher's
commands that run without a crawl): filters on handlers would miss a handler installed later,
and Scrapy formats some lines itself (its settings at start, "Redirecting ... from <GET ...>").
"""

from __future__ import annotations

import logging
from typing import Any

from fetcher.redact import redact

_TRACEBACKS = logging.Formatter()


class _RedactedRecord(logging.LogRecord):
    """A log record whose message is redacted when it is formatted (once per handler call)."""

    def getMessage(self) -> str:  # noqa: N802 - logging's name
        try:
            message = super().getMessage()
        except Exception:  # noqa: BLE001 - a bad format: logging would print msg and args raw
            message = f"{self.msg!s} (arguments: {self.args!r})"
        return redact(message)


def _make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _RedactedRecord(*args, **kwargs)
    if record.exc_info and not record.exc_text:  # formatted here, once, so no handler formats it raw
        record.exc_text = redact(_TRACEBACKS.formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


def redact_log_records() -> None:
    """Make every log record of this process a redacted one (idempotent; a factory another
    library installed is left in place, and said)."""
    factory = logging.getLogRecordFactory()
    if factory is _make_record:
        return
    if factory is not logging.LogRecord:
        logging.getLogger(__name__).warning(
            "A log record factory is installed already (%r): fetcher cannot redact credentials in log lines",
            factory)
        return
    logging.setLogRecordFactory(_make_record)
