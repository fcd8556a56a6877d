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
import logging
import pkgutil
import queue
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urldefrag

from scrapy import Request, Spider, signals
from scrapy.exceptions import CloseSpider

from fetcher import signals as fetcher_signals
from fetcher._scrapy_private import recheck_scraper_closing, spider_closing
from fetcher.addon import DEFAULTS
from fetcher.handlers import SINK_META, STREAMED_FLAG
from fetcher.items import BAD_LINE, FetchItem, FileRecord, run_key
from fetcher.naming import safe_relpath
from fetcher.pipelines import StreamingFilesPipeline
from fetcher.queue import Delivery, QueueUnavailable, RedisQueue, is_queue_url, parse_queue_url
from fetcher.redact import safe_line, safe_url
from fetcher.urllist import BadLine, Entry, ListWarning, open_list, parse_inline, parse_lines, text_lines
from fetcher.writer import HashingWriter

if TYPE_CHECKING:
    from scrapy.crawler import Crawler

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_IDLE_POLL = 0.02  # seconds between idleness checks once the list is exhausted
#: Scrapyd passes each argument on one command line, and past ~128 KiB the job never starts.
_MAX_INLINE = 64 * 1024
_QUEUE_POLL = 0.5  # seconds between looks at an empty queue
_BATCH = 256  # list entries handed over from the list-reading thread at a time
_PACKAGED = "package:"  # -a list=package:NAME: fetcher/lists/NAME, shipped in the package (or egg)


class ListUnavailable(Exception):
    """The list itself cannot be read: nothing can be done."""


class FetchSpider(Spider):
    name = "fetch"

    def __init__(self, list: str | None = None, urls: str | None = None, **kwargs: Any) -> None:  # noqa: A002
        super().__init__(**kwargs)
        self.check_arguments(list, urls)
        self.list_source = list
        self.inline_urls = urls
        self._seen: set[int] = set()
        self._pending = 0
        self.max_pending = DEFAULTS["FETCHER_MAX_PENDING"]  # from the settings in from_crawler
        self._room = asyncio.Event()
        self._closer: asyncio.Task[None] | None = None  # kept so the task is not garbage-collected
        self._warned: set[str] = set()
        #: Whether the whole list was read (every entry then has a record): the exit status needs it.
        self.list_complete = False
        self._queue: _QueueWorker | None = None

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
        elif list and list.startswith(_PACKAGED):
            _packaged_list(list)
        elif list and list != "-" and not _is_url(list):
            path = Path(list)
            if not path.is_file():
                raise ValueError(f"list file {list} does not exist or is not a file")
            try:
                path.open("rb").close()
            except OSError as exc:
                raise ValueError(f"list file {list} cannot be read: {exc.strerror}") from exc

    @classmethod
    def from_crawler(cls, crawler: Crawler, *args: Any, **kwargs: Any) -> FetchSpider:
        spider = super().from_crawler(crawler, *args, **kwargs)
        for signal in (signals.item_scraped, signals.item_dropped, signals.item_error):
            crawler.signals.connect(spider._item_done, signal=signal)
        settings = crawler.settings
        # Never fewer than twice the transfers that may run at once, or the list would starve them.
        spider.max_pending = max(settings.getint("FETCHER_MAX_PENDING", DEFAULTS["FETCHER_MAX_PENDING"]),
                                 2 * settings.getint("CONCURRENT_REQUESTS"), 1)
        return spider

    async def start(self) -> AsyncIterator[Any]:
        pipelines = getattr(self.crawler.engine.scraper.itemproc, "middlewares", ())
        pipeline = next((p for p in pipelines if isinstance(p, StreamingFilesPipeline)), None)
        if pipeline is None:
            logger.error("Nothing would be downloaded: fetcher.pipelines.StreamingFilesPipeline is not in "
                         "ITEM_PIPELINES (or FILES_STORE is empty)")
            raise CloseSpider("no_pipeline")
        if self.list_source and is_queue_url(self.list_source):
            self._queue = _QueueWorker(self.list_source, self.crawler.settings, pipeline)
            try:
                await asyncio.to_thread(self._queue.queue.check)
            except QueueUnavailable as exc:
                logger.error("Cannot use the queue: %s", exc)
                raise CloseSpider("queue_unavailable") from exc
        self._closer = asyncio.get_running_loop().create_task(self._close_when_done())
        count = 0
        stats = self.crawler.stats
        try:
            async for entry in self._entries():
                self._warn(entry.warnings)
                if isinstance(entry, BadLine):
                    stats.inc_value("fetcher/listed")
                    self._bad_line(entry)
                    continue
                key = run_key(urldefrag(entry.url)[0])  # x.bin#frag is x.bin: fragments never reach a server
                if key in self._seen and self._queue is None:  # a queue's entries are unique already
                    logger.warning("%s: duplicate of an earlier URL, skipped: %s", entry.where, safe_url(entry.url))
                    stats.inc_value("fetcher/duplicates")
                    continue
                self._seen.add(key)
                while self._pending >= self.max_pending:
                    self._room.clear()
                    await self._room.wait()
                self._pending += 1
                count += 1
                stats.inc_value("fetcher/listed")
                yield FetchItem(file_urls=[entry.url], fetcher_entries=[entry])
        except ListUnavailable as exc:
            logger.error("%s", exc)
            raise CloseSpider("list_unavailable") from exc
        if self._queue is not None and self._queue.lost:
            return  # the queue went away: what was taken finishes, and the exit status says so
        self.list_complete = True
        stats.set_value("fetcher/list_complete", True)  # fetcher/listed is now the total
        if not count:
            logger.warning("The list has no URLs to download")

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
                recheck_scraper_closing(self.crawler)
            elif stats.get_value("fetcher/list_complete") and engine.spider_is_idle():
                await engine.close_spider_async(reason="finished")
                return
            await asyncio.sleep(_IDLE_POLL)

    def _item_done(self, item: Any, **kwargs: Any) -> None:
        if isinstance(item, FetchItem):
            self._pending -= 1
            self._room.set()
            if self._queue is not None:
                self._queue.finished(item.file_urls[0])

    def _warn(self, warnings: tuple[ListWarning, ...]) -> None:
        """Each kind of warning once per run: a list of a million lines with one
        option fetcher ignores must not give a million log lines."""
        for w in warnings:
            if w.option not in self._warned:
                self._warned.add(w.option)
                logger.warning("%s: %s (said once per run)", w.where, w.message)

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
        if self.inline_urls:
            for e in parse_inline(self.inline_urls):
                yield e
            return
        source = self.list_source
        assert source
        if _is_url(source):
            with tempfile.TemporaryDirectory(prefix="fetcher-list-") as tmp:
                path = await self._download_list(source, Path(tmp) / "list.txt")
                self._count_ahead(path)
                async for e in _in_thread(lambda: _parse_file(path), batch=_BATCH):
                    yield e
            return
        if source.startswith(_PACKAGED):
            with tempfile.TemporaryDirectory(prefix="fetcher-list-") as tmp:
                path = Path(tmp) / "list"
                path.write_bytes(_packaged_list(source))
                self._count_ahead(path)
                async for e in _in_thread(lambda: _parse_file(path), batch=_BATCH):
                    yield e
            return
        if source != "-":
            self._count_ahead(Path(source))
        # stdin may be a pipe that another program is still writing: a thread
        # reads it so that waiting for the next line never blocks the downloads.
        if source == "-":  # a pipe: each line is handed over as it arrives
            async for e in _in_thread(_parse_stdin):
                yield e
        else:
            async for e in _in_thread(lambda: _parse_file(Path(source)), batch=_BATCH):
                yield e

    def _count_ahead(self, path: Path) -> None:
        """Count the list's URL lines in a thread, so the progress display has a
        total (and an ETA) long before the list is read; the first downloads do
        not wait for it. Standard input cannot be read twice: it shows what is known."""
        loop = asyncio.get_running_loop()
        stats = self.crawler.stats

        def count() -> None:
            with contextlib.suppress(OSError, ValueError, RuntimeError), open_list(path) as f:  # loop closed
                n = sum(1 for line in f if line.strip() and not line.startswith((" ", "\t", "#", "\ufeff#")))
                loop.call_soon_threadsafe(stats.set_value, "fetcher/list_counted", n)

        threading.Thread(target=count, name="fetcher-list-count", daemon=True).start()

    async def _download_list(self, url: str, dest: Path) -> Path:
        """Stream the list to a temporary file, so that even a huge one is read lazily.
        A failure is retried quietly (RETRY_TIMES, short backoff) and reported once."""
        settings = self.crawler.settings
        attempts = 1 + (settings.getint("RETRY_TIMES") if settings.getbool("RETRY_ENABLED") else 0)
        retry_codes = {int(c) for c in settings.getlist("RETRY_HTTP_CODES")}
        problem = ""
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(min(2.0**attempt / 4, 5.0))
            writer = HashingWriter(dest, url, ("md5",), resume=False)
            request = Request(url, meta={SINK_META: writer, "dont_retry": True},
                              headers={"Accept-Encoding": "identity"})
            try:
                response = await self.crawler.engine.download_async(request)
            except Exception as exc:  # noqa: BLE001 - any failure is worth another try
                problem = str(exc) or type(exc).__name__
                continue
            if STREAMED_FLAG in response.flags:
                writer.commit()
                return dest
            problem = f"HTTP {response.status}"
            if response.status not in retry_codes:
                break
        raise ListUnavailable(f"cannot fetch the list {url}: {problem}")


class _QueueWorker:
    """The spider's side of a shared queue (fetcher.queue): take entries as there
    is room, keep their leases alive while they download, and acknowledge each
    only after its record is in the store and in Redis. A worker that dies leaves
    its entries to the others after FETCHER_QUEUE_LEASE; a lost Redis stops the
    taking of work, and the run exits non-zero."""

    def __init__(self, url: str, settings: Any, pipeline: StreamingFilesPipeline) -> None:
        self.lease = settings.getfloat("FETCHER_QUEUE_LEASE", DEFAULTS["FETCHER_QUEUE_LEASE"])
        self.idle = settings.getfloat("FETCHER_QUEUE_IDLE", DEFAULTS["FETCHER_QUEUE_IDLE"])
        self.queue = RedisQueue(url, lease=self.lease, max_deliveries=settings.getint(
            "FETCHER_QUEUE_MAX_DELIVERIES", DEFAULTS["FETCHER_QUEUE_MAX_DELIVERIES"]))
        self.pipeline = pipeline
        self.lost = False
        self._taken: dict[str, list[str]] = {}  # URL -> ids of the deliveries it answers
        self._acks: set[asyncio.Task[None]] = set()

    async def entries(self, room: Callable[[], int]) -> AsyncIterator[Entry | BadLine]:
        heart = asyncio.get_running_loop().create_task(self._heartbeat())
        try:
            idle_since: float | None = None
            while not self.lost:
                free = room()
                deliveries = await self._call(self.queue.take, max(1, min(free, 256))) if free > 0 else []
                if deliveries is None:
                    return
                if deliveries:
                    idle_since = None
                    for delivery in deliveries:
                        for e in self._parse(delivery):
                            yield e
                    continue
                if free > 0 and not self._taken:  # nothing here: is there anything left anywhere?
                    drained = await self._call(self.queue.drained)
                    if drained is None:
                        return
                    now = asyncio.get_running_loop().time()
                    idle_since = idle_since if drained and idle_since is not None else (now if drained else None)
                    if self.idle and idle_since is not None and now - idle_since >= self.idle:
                        return
                await asyncio.sleep(_QUEUE_POLL)
        finally:
            heart.cancel()

    def _parse(self, delivery: Delivery) -> Iterator[Entry | BadLine]:
        parsed = [e for e in parse_lines(delivery.text.splitlines()) if isinstance(e, Entry | BadLine)]
        first = parsed[0] if parsed else BadLine(0, delivery.text, "empty queue entry", delivery.url)
        url = first.url if isinstance(first, Entry) else (first.url or first.text)
        self._taken.setdefault(url, []).append(delivery.id)
        yield first

    def finished(self, url: str) -> None:
        """The URL's record is in the store: copy it to Redis, then acknowledge."""
        ids = self._taken.pop(url, [])
        records = self.pipeline.records
        if not ids or records is None:
            return
        records.flush()  # an uptodate record may be waiting for its batch
        record = records.lookup(url)
        manifest = record.manifest() if record is not None else {"url": url, "status": "failed",
                                                                   "error": "no record was written"}
        task = asyncio.get_running_loop().create_task(self._ack(url, manifest, ids))
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    async def _ack(self, url: str, record: dict[str, Any], ids: list[str]) -> None:
        def ack() -> None:
            self.queue.record(url, record)
            for delivery_id in ids:
                self.queue.ack(delivery_id)

        await self._call(ack)

    async def _heartbeat(self) -> None:
        while not self.lost:
            await asyncio.sleep(max(self.lease / 3, 0.2))
            await self._call(self.queue.heartbeat)

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T | None:
        """A Redis call off the event loop; a lost Redis is said once and stops the taking of work."""
        try:
            return await asyncio.to_thread(fn, *args)
        except QueueUnavailable as exc:
            if not self.lost:
                self.lost = True
                logger.error("Lost the queue: %s; no more work is taken, and what is in flight is not "
                             "acknowledged (other workers take it over after FETCHER_QUEUE_LEASE)", exc)
            return None

    async def close(self) -> None:
        if self._acks:
            await asyncio.gather(*self._acks, return_exceptions=True)
        self.queue.close()


def _packaged_list(source: str) -> bytes:
    """A list shipped as package data in ``fetcher/lists/`` (read with pkgutil, so it
    works from an installed package or a Scrapyd egg alike). ValueError when absent."""
    name = source.removeprefix(_PACKAGED)
    try:
        data = pkgutil.get_data("fetcher", f"lists/{safe_relpath(name)}")
    except (OSError, ValueError) as exc:
        raise ValueError(f"no list {name!r} is packaged in fetcher/lists/") from exc
    if data is None:
        raise ValueError(f"no list {name!r} is packaged in fetcher/lists/")
    return data


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def _parse_file(path: Path) -> Iterator[Entry | BadLine]:
    try:
        with open_list(path) as f:
            yield from parse_lines(f)
    except OSError as exc:  # unreadable, or a damaged gzip
        raise ListUnavailable(f"cannot read the list {path}: {exc.strerror or exc}") from exc


def _parse_stdin() -> Iterator[Entry | BadLine]:
    """Standard input as UTF-8 whatever the locale, undecodable bytes replaced, like a list file."""
    yield from parse_lines(text_lines(sys.stdin.buffer))


_END = object()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def _in_thread(produce: Callable[[], Iterable[_T]], maxsize: int = 1024, batch: int = 1) -> AsyncIterator[_T]:
    """Iterate a blocking iterable in a thread, through a bounded queue, so
    that neither a slow source nor a fast one holds up the event loop. Items
    cross in lists of *batch* (a file: many at a time, each hand-over costs
    locks and a thread switch; a pipe: 1, so that no line waits for the next)."""
    loop = asyncio.get_running_loop()
    chunks: queue.Queue[list[Any]] = queue.Queue(max(1, maxsize // batch))
    ready = asyncio.Event()
    waiting = False

    def put(chunk: list[Any]) -> None:
        chunks.put(chunk)
        if waiting:  # wake the consumer only when it sleeps: one wake-up per batch
            loop.call_soon_threadsafe(ready.set)

    def run() -> None:
        chunk: list[Any] = []
        try:
            for item in produce():
                chunk.append(item)
                if len(chunk) >= batch:
                    put(chunk)
                    chunk = []
        except BaseException as exc:  # noqa: BLE001 - handed over to the consumer
            chunk.append(_Raised(exc))
        chunk.append(_END)
        put(chunk)

    threading.Thread(target=run, name="fetcher-list", daemon=True).start()
    while True:
        try:
            chunk = chunks.get_nowait()
        except queue.Empty:
            ready.clear()
            waiting = True
            if chunks.empty():
                await ready.wait()
            waiting = False
            continue
        for item in chunk:
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
