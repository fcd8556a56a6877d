"""A FilesPipeline that streams every file to disk instead of holding it in memory.

It keeps stock FilesPipeline's contract (``file_urls`` in, ``files`` out with
``url``/``path``/``checksum``/``status``, and stock's hooks), so any spider can
use it. This module holds Scrapy's side: the hooks, each file's name, its claim
in this run and its lock across processes, and the store's records at the start
and end of a run. A file's download is fetcher.transfer.attempts's; whether a file is
up to date, fetcher.store.freshness's; retries, fetcher.transfer.retry's; settings, fetcher.config's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast
from urllib.parse import urlsplit, urlunsplit

from itemadapter import ItemAdapter
from scrapy import signals as scrapy_signals
from scrapy.exceptions import IgnoreRequest
from scrapy.http import Request, Response
from scrapy.http.request import NO_CALLBACK
from scrapy.pipelines.files import FilesPipeline
from scrapy.pipelines.media import FileException
from scrapy.settings import SETTINGS_PRIORITIES
from scrapy.utils.asyncio import is_asyncio_available
from scrapy.utils.defer import ensure_awaitable
from scrapy.utils.misc import arg_to_iter
from twisted.python.failure import Failure

from fetcher import signals
from fetcher._scrapy_private import closing_began, spider_closing
from fetcher.config import Config
from fetcher.contract import ENTRY_META
from fetcher.exceptions import StartupError
from fetcher.items import BAD_LINE, FetchItem, FileRecord, run_key, url_key
from fetcher.listing.urllist import Entry
from fetcher.redact import safe_url
from fetcher.store.freshness import Freshness
from fetcher.store.naming import INDEX_NAME, owner_name, url_to_path
from fetcher.store.run_records import RunRecords
from fetcher.store.targets import (
    LocalTarget,
    RemoteTarget,
    Target,
    store_error,
    target_for,
)
from fetcher.transfer.attempts import Namer, Transfers
from fetcher.transfer.retry import FILTERED, AttemptFailed, Retrier

if TYPE_CHECKING:
    from os import PathLike

    from scrapy.crawler import Crawler
    from scrapy.pipelines.files import FileInfo
    from scrapy.pipelines.media import FileInfoOrError, MediaPipeline

logger = logging.getLogger(__name__)

_STOP_POLL = 0.25  # seconds: how soon a stopping run cuts its transfers
_LOCK_POLL = 0.1  # seconds between tries for a path another process is writing


class StreamingFilesPipeline(FilesPipeline):
    """FilesPipeline whose bodies go socket → hashing writer → ``<path>.part`` → ``<path>``.

    Needs :class:`fetcher.handlers.StreamingDownloadHandler` for http/https,
    and a FILES_STORE that is a local folder, ``s3://``, ``gs://`` or ``ftp://`` (the add-on,
    fetcher.Addon, sets both up). Settings: ``FETCHER_*`` (fetcher/config.py), stock's
    FILES_* and MEDIA_ALLOW_REDIRECTS, and RETRY_* through fetcher/transfer/retry.py. A pipeline that
    cannot work stops the run (StartupError) rather than being disabled.

    ``open_spider`` is stock's; fetcher's own opening and closing work hangs on the
    spider_opened and spider_closed signals, so a subclass that overrides
    ``open_spider`` or ``close_spider`` (with or without ``super()``) keeps it.
    """

    LOG_FAILED_RESULTS = False  # one readable line per failure is logged instead

    def __init__(self, store_uri: str | PathLike[str], *, crawler: Crawler) -> None:
        _make_local_store(str(store_uri))
        try:
            super().__init__(store_uri, crawler=crawler)
        except Exception as exc:  # making Scrapy's store: a missing library, a bad URI, no credentials
            raise store_error(str(store_uri), exc) from exc
        if not is_asyncio_available():
            raise StartupError(f"{type(self).__name__} needs the asyncio reactor (TWISTED_REACTOR)")
        self.config = config = Config.of(crawler)
        self.target: Target = target_for(self.store, str(store_uri), config, crawler.settings)
        # Checked before the engine starts: a store that cannot work stops the run before it begins.
        if isinstance(self.target, RemoteTarget):
            self.target.check()
        self.run_records = records = RunRecords(crawler, config, self.target)
        assert records.records is not None
        self.transfers = Transfers(crawler, config, self.target, Retrier.from_crawler(crawler), Freshness(
            self.target, records.records, verify=config.verify, expires=self.expires, algorithm=config.algorithm),
            allow_redirects=self.allow_redirects)
        self._inflight: dict[str, tuple[str, asyncio.Future[FileRecord]]] = {}
        # Which URL each path of this run belongs to (hashes: ~100 bytes a file on huge lists).
        self._claims: dict[int, int] = {}
        self._watcher: asyncio.Task[None] | None = None
        crawler.signals.connect(self._opened, signal=scrapy_signals.spider_opened)
        crawler.signals.connect(self._closed, signal=scrapy_signals.spider_closed)
        self._path_needs_response = _overrides(type(self), "file_path")
        self._warn_about_overrides()
        if config.layout == "hash" and crawler.settings.getpriority("FETCHER_LAYOUT") in (
                None, SETTINGS_PRIORITIES["addon"]) and records.records.has_paths_outside("full"):
            logger.warning(
                "%s holds files named after their URLs (fetcher's earlier default layout), but FETCHER_LAYOUT "
                "now defaults to 'hash' (stock FilesPipeline's full/<sha1>.<ext>): new files go there. Set "
                "FETCHER_LAYOUT = 'url' in the project's settings to keep the URL names.", self.target.describe())

    def _warn_about_overrides(self) -> None:
        """Say at start which of stock FilesPipeline's hooks a subclass overrides that
        streaming cannot call, and what to override instead (never a silent no-op)."""
        for name in ("file_downloaded", "media_downloaded"):
            if _overrides(type(self), name):
                logger.warning("%s.%s is not called by fetcher's streaming pipeline (the body is on disk, not in "
                               "response.body); override file_stored(file_info, response, request, info, *, item) "
                               "instead, which runs once the file is in the store", type(self).__name__, name)
        store = type(self.store)
        stock_store = FilesPipeline.STORE_SCHEMES.get(next(
            (k for k, v in type(self).STORE_SCHEMES.items() if v is store), ""))
        if stock_store is not None and store is not stock_store:
            logger.warning("%s (STORE_SCHEMES) is not used to write or stat files: fetcher streams into the store "
                           "itself, and its records say which files are complete", store.__name__)

    # -- the run (on signals: a subclass's open_spider/close_spider cannot lose it)

    def _opened(self) -> None:
        if not hasattr(self, "spiderinfo"):  # a subclass's open_spider that did not call stock's
            assert self.crawler.spider is not None
            self.spiderinfo = self.SpiderInfo(self.crawler.spider)
        self._watcher = asyncio.get_running_loop().create_task(self._stop_transfers_on_close())

    def _closed(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def _stop_transfers_on_close(self) -> None:
        """A stopped run (Ctrl-C, CLOSESPIDER_*) ends within seconds even with large
        files in flight: their transfers are cut and their .part files kept for the rerun."""
        assert self.crawler.engine is not None
        # The spider opens before the engine runs (and a Ctrl-C may come in between).
        while not (self.crawler.engine.running or closing_began(self.crawler)):
            await asyncio.sleep(_STOP_POLL)
        while not spider_closing(self.crawler):
            await asyncio.sleep(_STOP_POLL)
            self.run_records.flush()
        if cut := self.transfers.stop():
            logger.info("Stopping: cutting %d transfers in flight; their .part files are kept, and a rerun "
                        "resumes them (no second Ctrl-C needed)", cut)

    # -- stock FilesPipeline hooks

    def get_media_requests(self, item: Any, info: MediaPipeline.SpiderInfo) -> list[Request]:
        """Stock's requests for FILES_URLS_FIELD, each with its list entry (``out=``,
        checksum, headers) when the item carries ``fetcher_entries``."""
        if isinstance(item, FetchItem) and self.files_urls_field == "file_urls":  # the fetch spider's: built once
            return [_entry_request(e) for e in item.fetcher_entries]
        by_url = {e.url: e for e in ItemAdapter(item).get("fetcher_entries") or ()}
        return [_entry_request(by_url.get(r.url, Entry(r.url, 0))) for r in super().get_media_requests(item, info)]

    def file_path(
        self,
        request: Request,
        response: Response | None = None,
        info: MediaPipeline.SpiderInfo | None = None,
        *,
        item: Any = None,
    ) -> str:
        entry: Entry | None = request.meta.get(ENTRY_META)
        if entry is not None and entry.out:
            return entry.out
        if self.config.layout == "hash":
            return super().file_path(request, response, info, item=item)
        return url_to_path(request.url, keep_query=self.config.name_query)

    def media_to_download(self, request: Request, info: MediaPipeline.SpiderInfo, *,
                          item: Any = None) -> FileInfo | None:
        """Stock's hook to skip a download: a subclass may return a result (its status
        as it says). fetcher's own check (the store's records) runs when it returns None."""
        return None

    def media_failed(self, failure: Failure, request: Request, info: MediaPipeline.SpiderInfo) -> NoReturn:
        """Stock's contract: a filtered request raises stock's "filtered" marker, any other
        failure a FileException. A file fetcher failed itself (a FileException with its
        record's reason) was logged already."""
        if isinstance(failure.value, FileException):
            failure.raiseException()
        super().media_failed(failure, request, info)

    def media_downloaded(self, response: Response, request: Request, info: MediaPipeline.SpiderInfo, *,
                         item: Any = None) -> FileInfo:
        """Not called: a streamed body is on disk, not in ``response.body`` (see file_stored)."""
        raise NotImplementedError("fetcher's streaming pipeline calls file_stored instead")

    def file_stored(self, file_info: FileInfo, response: Response, request: Request,
                    info: MediaPipeline.SpiderInfo, *, item: Any = None) -> FileInfo:
        """fetcher's stand-in for stock's ``file_downloaded``/``media_downloaded``:
        called once a downloaded (or cached) file is complete in the store, with
        its ``files`` entry (``path`` relative to FILES_STORE); returns the entry."""
        return file_info

    async def process_item(self, item: Any, spider: Any = None) -> Any:
        info = self.spiderinfo
        requests: list[Request] = list(arg_to_iter(self.get_media_requests(item, info)))
        results = list(await asyncio.gather(*(self._process_request(r, item) for r in requests)))
        return self.item_completed(results, item, info)

    async def _process_request(self, request: Request, item: Any) -> FileInfoOrError:
        """One media request, through stock's hooks: media_to_download, then the
        streamed fetch, then file_stored or media_failed (and the request's errback)."""
        info = self.spiderinfo
        errback = request.errback
        request.callback, request.errback = NO_CALLBACK, None
        if ENTRY_META not in request.meta:  # a plain Request from a subclass's get_media_requests
            request.meta[ENTRY_META] = Entry(request.url, 0)
        try:
            if (found := await ensure_awaitable(self.media_to_download(request, info, item=item))) is not None:
                return True, found  # the subclass decided, as in stock: no download, no record
            record = await self._fetch_once(request, item)
            if isinstance(item, FetchItem):  # the fetch spider's item: one URL, and its record
                line = record.line  # made once, when it was recorded
                item.set_record(line if line is not None else self.run_records.stored(record).manifest())
            if record.status != "failed":
                result = cast("FileInfo", record.files_entry(request.url))
                if record.response is not None:
                    result = await ensure_awaitable(
                        self.file_stored(result, record.response, request, info, item=item))
                return True, result
            error = IgnoreRequest(record.error) if record.reason == FILTERED else FileException(record.error or "failed")
            self.media_failed(Failure(error), request, info)
            return True, None  # a media_failed that returns: stock's result is None too
        except Exception as exc:  # noqa: BLE001 - a hook's error is this file's result, as in stock
            failure = Failure(exc)
            if errback is not None:
                return True, errback(failure)
            return False, failure

    # -- one file: its name, its claim in this run, its lock across processes

    async def _fetch_once(self, request: Request, item: Any) -> FileRecord:
        """Fetch a file unless the same path is being fetched already."""
        entry: Entry = request.meta[ENTRY_META]
        try:
            path, final = self._settle(self._path_for(request, None, item))
        except AttemptFailed as failed:
            return self._finished(FileRecord(entry, "failed", error=str(failed), reason=failed.reason))
        if (why := self.run_records.reserved(path)) is not None:  # an out= or dir= aimed at the records
            reason = BAD_LINE if entry.out else "reserved path"
            error = f"{entry.where}: {why}" if entry.where else why
            return self._finished(FileRecord(entry, "failed", error=error, reason=reason))
        if path in self._inflight and self._inflight[path][0] == entry.url:
            return await asyncio.shield(self._inflight[path][1])  # the same file asked twice: one download
        if not self._claim(path, entry.url):  # another URL of this run has this name
            return self._finished(FileRecord(entry, "failed", error=f"another URL of this run is saved to {path}",
                                             reason="path conflict"))
        future = asyncio.get_running_loop().create_future()
        self._inflight[path] = (entry.url, future)
        try:
            async with contextlib.AsyncExitStack() as held:
                try:
                    await held.enter_async_context(self._owning(path))
                    record = await self._fetch(request, entry, path, final, item, held)
                except AttemptFailed as failed:  # stopped while another process had the file
                    record = FileRecord(entry, "failed", error=str(failed), reason=failed.reason)
                # Recorded while the path is still ours: another process that takes it
                # next finds the record, not a file it would have to ask the server about.
                self._finished(record)
        finally:
            del self._inflight[path]
        future.set_result(record)
        return record

    async def _fetch(self, request: Request, entry: Entry, path: str, final: Path | None, item: Any,
                     held: contextlib.AsyncExitStack) -> FileRecord:
        """Fetch *path* into *final* (_settle's, or None: resolved here, which says why it cannot be)."""
        try:
            final = final or self.target.local_path(path)
        except ValueError as exc:
            return FileRecord(entry, "failed", error=f"unsafe path {path!r}: {exc}", reason="unsafe path")
        if isinstance(self.target, LocalTarget):
            try:
                await self._clear_parents(path, final)
            except OSError as exc:
                return FileRecord(entry, "failed", path=path, error=f"cannot make the folders for {path}: "
                                  f"{exc.strerror or exc}", reason="disk error")
        try:
            return await self.transfers.fetch(request, entry, path, final, self._namer(request, item, path, held))
        except Exception as exc:  # a bug must not lose the record
            logger.exception("Unexpected error fetching %s", safe_url(entry.url))
            return FileRecord(entry, "failed", error=f"internal error: {exc!r}", reason="internal error")

    def _namer(self, request: Request, item: Any, path: str, held: contextlib.AsyncExitStack) -> Namer:
        """The final name once the response is known: a subclass's file_path may name the
        file after it. Another name is claimed and locked as the first one was."""

        async def name(response: Response) -> str:
            if not self._path_needs_response:
                return path
            named = self._path_for(request, response, item)
            if (why := self.run_records.reserved(named)) is not None:
                raise AttemptFailed(why, reason="reserved path", retryable=False, keep_part=False)
            if named != path:
                if not self._claim(named, request.meta[ENTRY_META].url):
                    raise AttemptFailed(f"another URL of this run is saved to {named}", reason="path conflict",
                                        retryable=False, keep_part=False)
                await held.enter_async_context(self._owning(named))
            return named

        return name

    def _path_for(self, request: Request, response: Response | None, item: Any) -> str:
        """``file_path``'s answer; what it raises fails the file. A subclass's error is logged
        with its traceback, as stock logs it (fetcher's own naming says why in the record)."""
        try:
            return self.file_path(request, response, self.spiderinfo, item=item)
        except Exception as exc:
            if self._path_needs_response or not isinstance(exc, ValueError):
                logger.error("File (error): %s.file_path failed for %s", type(self).__name__,
                             safe_url(request.url), exc_info=True)
            raise AttemptFailed(f"cannot name a file for {request.url}: {exc}", reason="bad URL",
                                retryable=False) from exc

    def worker_key(self, entry: Entry) -> int:
        """Which worker process gets *entry*: the key of its path's claim, so that URLs saved
        to one name meet in one worker (its URL's when its name depends on more than the entry:
        a subclass's file_path, or stock's hash of the whole URL, unique to it)."""
        if _overrides(type(self), "file_path"):
            return url_key(entry.url)
        path = entry.out
        if path is None and self.config.layout == "url":
            with contextlib.suppress(ValueError):
                path = url_to_path(entry.url, keep_query=self.config.name_query)
        return url_key(entry.url) if path is None else run_key(owner_name(path))

    def _claim(self, path: str, url: str) -> bool:
        """Take *path* (and its partial files' names) for *url* in this run; False when another URL has it."""
        owner = url_key(url)
        return self._claims.setdefault(run_key(owner_name(path)), owner) == owner

    def _settle(self, path: str) -> tuple[str, Path | None]:
        """wget's rule for a name that is also a folder (``/a`` and ``/a/b`` in one
        store): the file is saved as ``<name>/index.html``, like a URL ending in "/".
        Returns the name and, in a local store, where it is written (resolved once per file)."""
        if isinstance(self.target, RemoteTarget):
            return path, None
        try:
            final, folder = self.target.locate(path)
        except ValueError:  # an unsafe path: _fetch says so
            return path, None
        if folder:
            return f"{path}/{INDEX_NAME}", None  # its own name is checked by _fetch (it may be a link)
        return path, final

    async def _clear_parents(self, path: str, final: Path) -> None:
        """The other half of the rule: a finished file where a folder is needed moves
        to ``<name>/index.html`` (and its record with it) before this file is written."""
        assert isinstance(self.target, LocalTarget)
        if final.parent.is_dir():  # the common case: every folder is there, one stat says so
            # (a stat, not the target's known folders: another process may have put a file there)
            return
        segments = path.split("/")[:-1]
        for depth in range(1, len(segments) + 1):
            parent = "/".join(segments[:depth])
            try:
                local = self.target.local_path(parent)
            except ValueError:
                return
            if local.is_symlink() or not local.is_file():
                continue
            async with self._owning(parent):
                if local.is_file():  # not moved by another process meanwhile
                    _make_folder_of(local)
                    assert self.run_records.records is not None
                    self.run_records.records.move_path(parent, f"{parent}/{INDEX_NAME}")
                    logger.info("%s is also a folder now: the file is kept as %s/%s", parent, parent, INDEX_NAME)

    @contextlib.asynccontextmanager
    async def _owning(self, path: str) -> AsyncIterator[None]:
        """Be the only process writing *path* (and its partial files): another fetcher on the
        same store that has it is waited for (it may finish it: the records then say so)."""
        waited, key = False, owner_name(path)
        while not self.run_records.locks.try_acquire(key):
            if not waited:
                logger.debug("Waiting for another process writing %s", path)
                waited = True
            if spider_closing(self.crawler):
                raise AttemptFailed.stopped(f"the run was stopped while another process was writing {path}")
            await asyncio.sleep(_LOCK_POLL)
        try:
            yield
        finally:
            self.run_records.locks.release(key)

    def _finished(self, record: FileRecord) -> FileRecord:
        if record.status == "failed" and record.reason != FILTERED:  # filtered: stock's debug line says it
            logger.error("Failed %s: %s", safe_url(record.url), record.error)
        self.inc_stats(record.status)
        self.crawler.signals.send_catch_log(signals.file_finished, record=record)
        return record


def _make_local_store(uri: str) -> None:
    """Create a local FILES_STORE before Scrapy's FSFilesStore looks for it: it checks, then
    creates, so two processes starting at once into a new store would race (EEXIST)."""
    if "://" not in uri or uri.startswith("file://"):
        with contextlib.suppress(OSError):  # Scrapy's store then says what is wrong
            Path(uri.removeprefix("file://")).mkdir(parents=True, exist_ok=True)


def _make_folder_of(local: Path) -> None:
    """Turn the file *local* into a folder holding it as ``index.html``."""
    moving = local.with_name(local.name + ".fetcher-moving")
    os.replace(local, moving)
    local.mkdir()
    os.replace(moving, local / INDEX_NAME)


def _entry_request(entry: Entry) -> Request:
    headers = _entry_headers(entry)
    meta: dict[str, Any] = {ENTRY_META: entry}
    if any(name.lower() == "cookie" for name in headers):
        # A header=Cookie: goes out as given: Scrapy's cookie middleware would replace it with its
        # jar's. Scrapy's redirect middleware still drops it on a redirect to another host.
        meta["dont_merge_cookies"] = True
    return Request(entry.url, callback=NO_CALLBACK, headers=headers, meta=meta)


def _entry_headers(entry: Entry) -> dict[str, str]:
    """The list's per-entry headers (``header=``, ``referer=``, ``user-agent=``)."""
    headers = dict(entry.headers)
    if entry.referer is not None:
        headers["Referer"] = _without_userinfo(entry.url) if entry.referer == "*" else entry.referer
    if entry.user_agent is not None:
        headers["User-Agent"] = entry.user_agent
    return headers


def _without_userinfo(url: str) -> str:
    """*url* as a Referer: no user:password (it would land in the origin's access logs)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _overrides(cls: type, name: str) -> bool:
    """Whether a subclass of fetcher's pipeline defines its own *name*."""
    return getattr(cls, name) is not getattr(StreamingFilesPipeline, name)
