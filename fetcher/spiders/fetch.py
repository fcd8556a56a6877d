"""The ``fetch`` spider: one download per URL of a list.

    scrapy crawl fetch -a list=urls.txt        # a file
    scrapy crawl fetch -a list=-               # standard input
    scrapy crawl fetch -a list=https://h/l.txt # a list fetched over HTTP (Scrapyd)
    scrapy crawl fetch -a urls="URL URL ..."   # inline
    scrapy crawl fetch -a list=redis://host:6379/0?queue=NAME  # a worker on a shared queue
    scrapy crawl fetch -a list=package:NAME    # a list shipped in fetcher/lists/ (Scrapyd eggs)

The list is read lazily (gzip-compressed lists too), and no more than
FETCHER_MAX_PENDING entries are in progress at once, so a list of millions of
URLs costs memory for its duplicate check only. Bad lines become failed
records; they never stop the run. Options fetcher does not implement are
warned about once per run, and their URLs are still downloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from scrapy import Request, Spider, signals
from scrapy.exceptions import CloseSpider

from fetcher import signals as fetcher_signals
from fetcher._scrapy_private import recheck_scraper_closing, spider_closing
from fetcher.config import Config, WorkerChannel
from fetcher.contract import SINK_META, STREAMED_FLAG
from fetcher.items import BAD_LINE, FetchItem, FileRecord, url_key
from fetcher.listing.sources import (
    ListFetchFailed,
    ListUnavailable,
    ListWarnings,
    check_source,
    count_entries,
    in_thread,
    local_copy,
    read_entries,
)
from fetcher.listing.urllist import BadLine, Entry, parse_inline
from fetcher.pipelines import StreamingFilesPipeline
from fetcher.queue.stream import QueueUnavailable, is_queue_url, parse_queue_url
from fetcher.queue.worker import QueueWorker
from fetcher.redact import safe_line, safe_url
from fetcher.store.writer import HashingWriter
from fetcher.transfer.retry import Retrier
from fetcher.workers import channel
from fetcher.workers.crew import Crew
from fetcher.workers.plan import (
    AUTO_MIN_ENTRIES,
    AUTO_WAIT,
    Limits,
    choose,
    shares,
    worker_argv,
    worker_env,
)

if TYPE_CHECKING:
    from scrapy.crawler import Crawler

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

_IDLE_POLL = 0.02  # seconds between idleness checks once the list is exhausted
#: Scrapyd passes each argument on one command line, and past ~128 KiB the job never starts.
_MAX_INLINE = 64 * 1024


class FetchSpider(Spider):
    name = "fetch"

    def __init__(self, list: str | None = None, urls: str | None = None, **kwargs: Any) -> None:  # noqa: A002
        super().__init__(**kwargs)
        self.check_arguments(list, urls)
        self.list_source = list
        self.inline_urls = urls
        self._seen: set[int] = set()
        self._pending = 0
        self.max_pending = 1  # from the config in from_crawler
        self.in_worker = False  # a worker process of a run (fetcher.workers): its run reads the list
        self._room = asyncio.Event()
        self._closer: asyncio.Task[None] | None = None  # kept so the task is not garbage-collected
        self._warnings = ListWarnings()
        #: Whether the whole list was read (every entry then has a record): the exit status needs it.
        self.list_complete = False
        self._queue: QueueWorker | None = None
        self._crew: Crew | None = None  # the run's worker processes, when it has them
        self.retrier: Retrier  # the list download's, made at start (the crawler's stats exist from then on)

    @staticmethod
    def check_arguments(list: str | None = None, urls: str | None = None, **_: Any) -> None:  # noqa: A002
        """Refuse a run that cannot start, before anything starts (ValueError)."""
        if bool(list) == bool(urls):
            raise ValueError('give the URLs with either -a list=PATH|-|URL|REDIS_URL or -a urls="URL URL ..."')
        if urls and len(urls.encode()) > _MAX_INLINE:
            raise ValueError(f"-a urls= holds {len(urls.encode()):,} bytes; past {_MAX_INLINE // 1024} KiB give the "
                             "URLs as a list: -a list=PATH, -a list=https://host/list.txt, or a queue (scrapy enqueue)")
        if list and is_queue_url(list):
            parse_queue_url(list)  # ValueError for a malformed one
        elif list:
            check_source(list)

    @classmethod
    def from_crawler(cls, crawler: Crawler, *args: Any, **kwargs: Any) -> FetchSpider:
        spider = super().from_crawler(crawler, *args, **kwargs)
        for signal in (signals.item_scraped, signals.item_dropped, signals.item_error):
            crawler.signals.connect(spider._item_done, signal=signal)
        spider.max_pending = Config.of(crawler).max_pending
        spider.in_worker = Config.of(crawler).worker_channel is not None
        return spider

    async def start(self) -> AsyncIterator[Any]:
        pipelines = getattr(self.crawler.engine.scraper.itemproc, "middlewares", ())
        pipeline = next((p for p in pipelines if isinstance(p, StreamingFilesPipeline)), None)
        if pipeline is None:
            logger.error("Nothing would be downloaded: fetcher.pipelines.StreamingFilesPipeline is not in "
                         "ITEM_PIPELINES (or FILES_STORE is empty)")
            raise CloseSpider("no_pipeline")
        self.retrier = Retrier.from_crawler(self.crawler)
        if self.list_source and is_queue_url(self.list_source):
            self._queue = QueueWorker(self.list_source, Config.of(self.crawler), pipeline.run_records.manifest_line)
            try:
                await asyncio.to_thread(self._queue.queue.check)
            except QueueUnavailable as exc:
                logger.error("Cannot use the queue: %s", exc)
                raise CloseSpider("queue_unavailable") from exc
        self._closer = asyncio.get_running_loop().create_task(self._close_when_done())
        count = 0
        try:
            entries = await self._with_workers(self._entries(), pipeline)
            async for listed in entries:
                if (entry := await self._admit(listed)) is not None:
                    count += 1
                    if self._crew is None:
                        yield FetchItem(file_urls=[entry.url], fetcher_entries=[entry])
                    else:  # a worker process fetches it; its record comes back as the item (_answered)
                        self._crew.deal(entry)
            if self._crew is not None:
                await self._crew.drained()  # the engine is not idle while the workers have entries
        except ListUnavailable as exc:
            logger.error("%s", exc)
            raise CloseSpider("list_unavailable") from exc
        finally:
            self._warnings.close()
        if self._queue is not None and self._queue.lost:
            return  # the queue went away: what was taken finishes, and the exit status says so
        self.list_complete = True
        self.crawler.stats.set_value("fetcher/list_complete", True)  # fetcher/listed is now the total
        if not count and not self.in_worker:  # a worker may get none
            logger.warning("The list has no URLs to download")

    async def _admit(self, entry: Entry | BadLine) -> Entry | None:
        """The entry, once there is room for it; None for a bad line or a duplicate."""
        stats = self.crawler.stats
        if not self.in_worker:  # a worker's entries were said by its run
            self._warnings.say(entry.warnings)
        if isinstance(entry, BadLine):
            stats.inc_value("fetcher/listed")
            self._bad_line(entry)
            return None
        if self._queue is None and not self.in_worker:  # a queue's or a run's entries are unique already
            key = url_key(entry.url)
            if key in self._seen:
                logger.warning("%s: duplicate of an earlier URL, skipped: %s", entry.where, safe_url(entry.url))
                stats.inc_value("fetcher/duplicates")
                return None
            self._seen.add(key)
        while self._pending >= self.max_pending:
            self._room.clear()
            await self._room.wait()
        self._pending += 1
        stats.inc_value("fetcher/listed")
        return entry

    async def closed(self, reason: str) -> None:
        """Acknowledgements still on their way to Redis finish before the process ends."""
        if self._queue is not None:
            await self._queue.close()

    async def _close_when_done(self) -> None:
        """Close as soon as the last file is done, not on the engine's next
        5-second heartbeat (the engine only checks for idleness after downloads,
        and the pipeline's work comes after its last download); and let a
        graceful stop end once the files in progress are (see _scrapy_private)."""
        engine = self.crawler.engine
        stats = self.crawler.stats
        while engine.spider is self:
            if spider_closing(self.crawler):
                if self._crew is not None:
                    self._crew.stop()
                recheck_scraper_closing(self.crawler)
            elif stats.get_value("fetcher/list_complete") and engine.spider_is_idle():
                await engine.close_spider_async(reason="finished")
                return
            await asyncio.sleep(_IDLE_POLL)

    async def _with_workers(self, entries: AsyncIterator[Entry | BadLine],
                            pipeline: StreamingFilesPipeline) -> AsyncIterator[Entry | BadLine]:
        """Start the run's worker processes when FETCHER_WORKERS asks for them; ``auto``
        first reads up to AUTO_MIN_ENTRIES entries, for at most AUTO_WAIT seconds."""
        config = Config.of(self.crawler)
        kind = "queue" if self._queue is not None else "list" if self.list_source else "inline"
        if config.workers == 1:  # a worker process's too
            return entries
        first: list[Entry | BadLine] = []
        waiting: asyncio.Future[Entry | BadLine] | None = None  # the next entry, when it was late
        if config.workers is None and kind == "list":
            loop = asyncio.get_running_loop()
            deadline = loop.time() + AUTO_WAIT
            while len(first) < AUTO_MIN_ENTRIES:
                # Each entry awaited with the deadline, never cancelled: a late one is the next entry.
                waiting = asyncio.ensure_future(anext(entries))
                if not (await asyncio.wait({waiting}, timeout=max(0.0, deadline - loop.time())))[0]:
                    break
                next_entry, waiting = waiting, None
                try:
                    first.append(next_entry.result())
                except StopAsyncIteration:
                    break
        limits = Limits.of(self.crawler.settings, config.max_pending)
        plan = choose(config.workers, limits, entries=len(first), kind=kind, scrapyd=hasattr(self, "_job"))
        if plan.why:
            logger.warning("%s", plan.why)
        if plan.workers > 1:
            self._start_crew(plan.workers, limits, pipeline)
        return _chained(first, waiting, entries)

    def _start_crew(self, n: int, limits: Limits, pipeline: StreamingFilesPipeline) -> None:
        shared = tempfile.mkdtemp(prefix="fetcher-limits-")  # private (0700): the workers' shared caps
        run_id = pipeline.run_records.run_id
        signals_ = self.crawler.signals

        def command(index: int, fd: int) -> list[str]:
            own = {**shares(limits, n, index), "FETCHER_WORKERS": "1", "FETCHER_PROGRESS": "off",
                   "FETCHER_WORKER_CHANNEL": str(WorkerChannel(fd, os.getpid(), run_id)),
                   "FETCHER_SHARED_LIMITS": shared, "LOG_ENABLED": "False", "STATS_DUMP": "False",
                   "FILES_STORE": str(self.crawler.settings.get("FILES_STORE"))}
            return worker_argv(self.name, self.crawler.settings, own)

        crew = Crew(n, command, env=worker_env(), key=pipeline.worker_key, answered=self._answered,
                    stats=self.crawler.stats,
                    failed=self._run_failed,
                    unwritten=lambda: signals_.send_catch_log(fetcher_signals.records_unwritten))

        async def finish() -> None:
            await crew.finish()
            shutil.rmtree(shared, ignore_errors=True)

        self._crew = crew
        pipeline.run_records.writers.append(finish)

    def _run_failed(self, reason: str) -> None:
        """Something outside the records makes the run fail (a worker process could not start)."""
        logger.error("%s", reason)
        self.crawler.signals.send_catch_log(fetcher_signals.run_failed, reason=reason)

    def _answered(self, record: FileRecord) -> None:
        """An entry's record, from a worker process (in the store already, and through the item
        pipelines there) or from the run (stopped before a worker had it: recorded here). It is
        reported, and exported as the fetch spider's item, as if this process had fetched it."""
        if record.line is None:
            logger.error("Failed %s: %s", safe_url(record.url), record.error)
        signals_ = self.crawler.signals
        signals_.send_catch_log(fetcher_signals.file_finished, record=record)
        item = FetchItem(file_urls=[record.url])
        if record.status != "failed":
            item.files = [record.files_entry()]
        if record.line is not None:
            item.set_record(record.line)
        signals_.send_catch_log(signals.item_scraped, item=item, response=None, spider=self)

    def _item_done(self, item: Any, **kwargs: Any) -> None:
        if isinstance(item, FetchItem):
            self._pending -= 1
            self._room.set()
            if self._queue is not None:
                self._queue.finished(item.file_urls[0])

    def _bad_line(self, bad: BadLine) -> None:
        shown = safe_line(bad.text)
        logger.error("%s: %s: %s", bad.where, bad.reason, shown)
        entry = Entry(bad.url or bad.text, bad.line)
        self.crawler.signals.send_catch_log(
            fetcher_signals.file_finished,
            record=FileRecord(entry, "failed", error=f"{bad.where}: {bad.reason}: {shown}", reason=BAD_LINE),
        )
        if self._queue is not None:
            self._queue.finished(entry.url)

    async def _entries(self) -> AsyncIterator[Entry | BadLine]:
        if self._queue is not None:
            async for e in self._queue.entries(lambda: self.max_pending - self._pending):
                yield e
            return
        if self.in_worker:  # its run deals the entries
            async for e in in_thread(functools.partial(channel.messages, sys.stdin.fileno())):
                yield e
            return
        if self.inline_urls:
            for e in parse_inline(self.inline_urls):
                yield e
            return
        assert self.list_source
        async with local_copy(self.list_source, self._fetch_list, self.retrier) as path:
            if path is not None:
                self._count_ahead(path)
            config = Config.of(self.crawler)
            async for e in read_entries(path, max_line=config.max_line, max_options=config.max_options):
                yield e

    def _count_ahead(self, path: Path) -> None:
        """Count the list's URL lines in a thread, so the progress display has a
        total (and an ETA) long before the list is read; the first downloads do
        not wait for it. Standard input cannot be read twice: it shows what is known."""
        loop = asyncio.get_running_loop()
        stats = self.crawler.stats
        max_line = Config.of(self.crawler).max_line

        def count() -> None:
            with contextlib.suppress(OSError, ValueError, RuntimeError):  # RuntimeError: the loop closed
                n = count_entries(path, max_line=max_line)
                loop.call_soon_threadsafe(stats.set_value, "fetcher/list_counted", n)

        threading.Thread(target=count, name="fetcher-list-count", daemon=True).start()

    async def _fetch_list(self, url: str, dest: Path) -> None:
        """One attempt to stream a list URL to *dest* through Scrapy's engine (and so through
        fetcher's handler: proxies, credentials and limits as for the files)."""
        writer = HashingWriter(dest, url, ("md5",), resume=False)
        request = Request(url, meta={SINK_META: writer, "dont_retry": True}, headers={"Accept-Encoding": "identity"})
        try:
            response = await self.crawler.engine.download_async(request)
        except Exception as exc:  # noqa: BLE001 - any failure is worth another try
            raise ListFetchFailed(str(exc) or type(exc).__name__, retryable=True) from exc
        if STREAMED_FLAG not in response.flags:
            raise ListFetchFailed(f"HTTP {response.status}", retryable=response.status in self.retrier.policy.http_codes)
        writer.commit()


async def _chained(first: list[_T], waiting: asyncio.Future[_T] | None,
                   rest: AsyncIterator[_T]) -> AsyncIterator[_T]:
    """*first*, then the entry still *waiting* (if any), then the *rest*."""
    for item in first:
        yield item
    if waiting is not None:
        try:
            yield await waiting
        except StopAsyncIteration:
            return
    async for item in rest:
        yield item
