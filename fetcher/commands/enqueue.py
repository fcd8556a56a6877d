"""``scrapy enqueue REDIS_URL LIST``: push a list into a shared queue for workers.

    scrapy enqueue redis://host:6379/0 urls.txt          # a list file (plain or gzip)
    scrapy enqueue 'redis://:pw@host:6379/0?queue=isos' -  < urls.txt
    scrapy enqueue redis://host:6379/0 https://host/list.txt

The list is read lazily and sent in batches, so millions of URLs take seconds
and flat memory. A URL already in the queue (from this list or an earlier one)
is enqueued once. Bad lines are reported with their line numbers and recorded
as failed in the queue's records. Exit status 1 when a line was bad.
"""

from __future__ import annotations

import logging
import sys
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from scrapy.commands import ScrapyCommand
from scrapy.exceptions import UsageError

from fetcher.queue import QueueUnavailable, RedisQueue, is_queue_url, parse_queue_url
from fetcher.records import StoredRecord, new_run_id, utc_now
from fetcher.urllist import BadLine, Entry, open_list, parse_lines, text_lines

if TYPE_CHECKING:
    import argparse

logger = logging.getLogger(__name__)


class Command(ScrapyCommand):
    requires_crawler_process = False

    def syntax(self) -> str:
        return "REDIS_URL LIST"

    def short_desc(self) -> str:
        return "Push a URL list (a path, - for standard input, or an http(s) URL) into a shared queue"

    def long_desc(self) -> str:
        return (__doc__ or "").strip()

    def run(self, args: list[str], opts: argparse.Namespace) -> None:
        if len(args) != 2 or not is_queue_url(args[0]):
            raise UsageError("give a queue and a list: scrapy enqueue redis://host:6379/0[?queue=NAME] LIST")
        url, source = args
        try:
            parse_queue_url(url)
        except ValueError as exc:
            raise UsageError(str(exc), print_help=False) from exc
        queue = RedisQueue(url)
        counter = _Counter(queue, new_run_id())
        try:
            queue.check()
            with _lines(source) as lines:
                added, duplicates = queue.enqueue(counter.entries(lines))
        except QueueUnavailable as exc:
            logger.error("Cannot use the queue: %s", exc)
            self.exitcode = 1
            return
        except OSError as exc:
            logger.error("Cannot read the list %s: %s", source, exc)
            self.exitcode = 1
            return
        finally:
            queue.close()
        print(f"Enqueued {added} URLs into {queue.name}: {duplicates} already queued, "
              f"{counter.bad} bad lines", file=sys.stderr)
        if counter.bad:
            self.exitcode = 1


class _Counter:
    """The list's entries as (url, text) for the queue; bad lines reported and recorded as failed."""

    def __init__(self, queue: RedisQueue, run: str) -> None:
        self.queue = queue
        self.run = run
        self.bad = 0

    def entries(self, lines: Iterator[str]) -> Iterator[tuple[str, str]]:
        warned: set[str] = set()
        for entry in parse_lines(lines):
            for w in entry.warnings:
                if w.option not in warned:
                    warned.add(w.option)
                    logger.warning("%s: %s (said once)", w.where, w.message)
            if isinstance(entry, BadLine):
                self.bad += 1
                error = f"{entry.where}: {entry.reason}: {entry.text}"
                logger.error("%s", error)
                key = entry.url or entry.text
                self.queue.record(key, StoredRecord(key, "failed", error=error, run=self.run,
                                                    finished_at=utc_now()).manifest())
                continue
            assert isinstance(entry, Entry)
            yield entry.url, entry.to_line()


class _lines:  # noqa: N801 - a context manager used like a function
    """The lines of a list given as a path, "-" or an http(s) URL."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._close: Any = None

    def __enter__(self) -> Iterator[str]:
        if self.source == "-":
            return text_lines(sys.stdin.buffer)
        if self.source.startswith(("http://", "https://")):
            response = urllib.request.urlopen(self.source, timeout=60)  # noqa: S310 - http(s) only, checked above
            self._close = response.close
            return text_lines(response)
        f = open_list(self.source)
        self._close = f.close
        return iter(f)

    def __exit__(self, *exc: object) -> None:
        if self._close is not None:
            self._close()
