"""``scrapy enqueue REDIS_URL LIST``: push a list into a shared queue for workers.

    scrapy enqueue redis://host:6379/0 urls.txt          # a list file (plain or gzip)
    scrapy enqueue 'redis://:pw@host:6379/0?queue=isos' -  < urls.txt
    scrapy enqueue redis://host:6379/0 https://host/list.txt
    scrapy enqueue redis://host:6379/0 package:example.txt

The list is read as the fetch spider reads it (fetcher/listing/sources.py): a list URL
is fetched to a temporary file first, retried as every transfer is.

The list is read lazily and sent in batches, so millions of URLs take seconds
and flat memory. A URL already in the queue (from this list or an earlier one)
is enqueued once. Bad lines are reported with their line numbers and recorded
as failed in the queue's records. Exit status 1 when a line was bad.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from scrapy.commands import ScrapyCommand
from scrapy.exceptions import UsageError

from fetcher.config import Config
from fetcher.exceptions import StartupError
from fetcher.listing.sources import (
    ListFetchFailed,
    ListUnavailable,
    ListWarnings,
    check_source,
    entries_of,
    local_copy,
)
from fetcher.listing.urllist import BadLine, Entry
from fetcher.logs import redact_log_records
from fetcher.queue.stream import (
    QueueUnavailable,
    RedisQueue,
    is_queue_url,
    parse_queue_url,
)
from fetcher.redact import safe_line
from fetcher.store.records import StoredRecord, new_run_id, utc_now
from fetcher.transfer.retry import Retrier

if TYPE_CHECKING:
    import argparse

logger = logging.getLogger(__name__)
_LIST_TIMEOUT = 60  # seconds a list server may stay silent


class Command(ScrapyCommand):
    requires_crawler_process = False

    def syntax(self) -> str:
        return "REDIS_URL LIST"

    def short_desc(self) -> str:
        return "Push a URL list (a path, - for standard input, an http(s) URL or package:NAME) into a shared queue"

    def long_desc(self) -> str:
        return (__doc__ or "").strip()

    def run(self, args: list[str], opts: argparse.Namespace) -> None:
        redact_log_records()  # no crawl here, so no add-on to do it
        if len(args) != 2 or not is_queue_url(args[0]):
            raise UsageError("give a queue and a list: scrapy enqueue redis://host:6379/0[?queue=NAME] LIST")
        url, source = args
        try:
            parse_queue_url(url)
            check_source(source)
        except ValueError as exc:
            raise UsageError(str(exc), print_help=False) from exc
        assert self.settings is not None
        try:
            config = Config.from_settings(self.settings)
        except StartupError as exc:
            logger.error("Cannot start: %s", exc)
            self.exitcode = 1
            return
        queue = RedisQueue(url)
        counter = _Counter(queue, new_run_id())
        try:
            queue.check()
            added, duplicates = asyncio.run(self._enqueue(queue, counter, source, config))
        except QueueUnavailable as exc:
            logger.error("Cannot use the queue: %s", exc)
            self.exitcode = 1
            return
        except ListUnavailable as exc:
            logger.error("%s", exc)
            self.exitcode = 1
            return
        finally:
            queue.close()
        print(f"Enqueued {added} URLs into {queue.name}: {duplicates} already queued, "
              f"{counter.bad} bad lines", file=sys.stderr)
        if counter.bad:
            self.exitcode = 1

    async def _enqueue(self, queue: RedisQueue, counter: _Counter, source: str, config: Config) -> tuple[int, int]:
        """Read the list as the fetch spider reads it (fetcher.listing.sources) and send it in batches."""
        assert self.settings is not None
        retrier = Retrier.from_settings(self.settings)
        fetch = functools.partial(_fetch, retry_codes=retrier.policy.http_codes)
        async with local_copy(source, fetch, retrier) as path:
            entries = entries_of(path, max_line=config.max_line, max_options=config.max_options)
            return await asyncio.to_thread(queue.enqueue, counter.entries(entries))


class _Counter:
    """The list's entries as (url, text) for the queue; bad lines reported and recorded as failed."""

    def __init__(self, queue: RedisQueue, run: str) -> None:
        self.queue = queue
        self.run = run
        self.bad = 0

    def entries(self, parsed: Iterator[Entry | BadLine]) -> Iterator[tuple[str, str]]:
        warnings = ListWarnings()
        for entry in parsed:
            warnings.say(entry.warnings)
            if isinstance(entry, BadLine):
                self.bad += 1
                error = f"{entry.where}: {entry.reason}: {safe_line(entry.text)}"
                logger.error("%s", error)
                key = entry.url or entry.text
                self.queue.record(key, StoredRecord(key, "failed", error=error, run=self.run,
                                                    finished_at=utc_now()).manifest())
                continue
            yield entry.url, entry.to_line()
        warnings.close()


async def _fetch(url: str, dest: Path, *, retry_codes: frozenset[int]) -> None:
    """One attempt to fetch a list URL with the standard library (no crawl runs here)."""

    def get() -> None:
        try:
            with urllib.request.urlopen(url, timeout=_LIST_TIMEOUT) as response, dest.open("wb") as out:  # noqa: S310
                while chunk := response.read(1 << 16):
                    out.write(chunk)
        except urllib.error.HTTPError as exc:
            raise ListFetchFailed(f"HTTP {exc.code}", retryable=exc.code in retry_codes) from None
        except (OSError, ValueError) as exc:
            raise ListFetchFailed(str(getattr(exc, "reason", None) or exc), retryable=True) from None

    await asyncio.to_thread(get)
