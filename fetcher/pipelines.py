"""A FilesPipeline that streams every file to disk instead of holding it in memory.

It keeps stock FilesPipeline's contract (``file_urls`` in, ``files`` out with
``url``/``path``/``checksum``/``status``), so any spider can use it; and it owns
each file's whole life and the store's records: skip it when its record says it
is complete (a stat, no read), resume its ``.part``, retry with backoff while
holding no concurrency slot, check the expected checksum, rename it into place
(or upload it to a remote store), and record how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shlex
import time
from collections.abc import AsyncIterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urldefrag

from itemadapter import ItemAdapter
from scrapy.http import Request, Response
from scrapy.http.request import NO_CALLBACK
from scrapy.pipelines.files import FilesPipeline
from scrapy.pipelines.media import FileException
from scrapy.settings import SETTINGS_PRIORITIES
from scrapy.utils.asyncio import is_asyncio_available
from scrapy.utils.defer import ensure_awaitable
from scrapy.utils.misc import arg_to_iter
from scrapy.utils.python import global_object_name
from scrapy.utils.response import response_status_message
from twisted.python.failure import Failure

from fetcher import signals
from fetcher._scrapy_private import spider_closing
from fetcher.addon import DEFAULTS
from fetcher.backoff import Backoff, retry_after_seconds
from fetcher.cli import INVOKED_AS
from fetcher.exceptions import StartupError
from fetcher.handlers import DATALOSS_FLAG, SINK_META, STREAMED_FLAG, UNVERIFIED_END_FLAG
from fetcher.items import BAD_LINE, FetchItem, FileRecord, run_key
from fetcher.naming import INDEX_NAME, url_to_path
from fetcher.records import PathLocks, RecordStore, StoredRecord, new_run_id, utc_now
from fetcher.redact import safe_url
from fetcher.retry import CACHED_FLAG, Action, Attempt, RetryPolicy, Verdict, reason_of
from fetcher.segments import Segment, SegmentSink, SegmentState
from fetcher.stores import LocalTarget, RemoteObject, RemoteTarget, Target, store_error, target_for
from fetcher.urllist import Entry
from fetcher.writer import BodyError, HashingWriter, Sink, Validators, hash_file

if TYPE_CHECKING:
    from os import PathLike

    from scrapy.crawler import Crawler
    from scrapy.pipelines.files import FileInfo
    from scrapy.pipelines.media import FileInfoOrError, MediaPipeline

logger = logging.getLogger(__name__)

ENTRY_META = "fetcher_entry"
_END_CHECKS = 3  # Range requests that may confirm the end of a body that had no length
_STOP_POLL = 0.5  # seconds: how soon a backoff notices that the run is being stopped
_LOCK_POLL = 0.1  # seconds between tries for a path another process is writing
_VERIFY_MODES = ("stat", "full")


class _Outcome(Exception):
    """One attempt's end that is not a finished file: what fetcher/retry.py decided,
    or the pipeline's own reason to give up (a checksum mismatch, a stopped run)."""

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
    def of(cls, verdict: Verdict, http_status: int | None = None) -> _Outcome:
        return cls(verdict.message, reason=verdict.reason, retryable=verdict.action is not Action.GIVE_UP,
                   http_status=http_status, retry_after=verdict.retry_after, keep_part=verdict.keep_part,
                   free=verdict.action in (Action.START_OVER, Action.CHECK_END))


class StreamingFilesPipeline(FilesPipeline):
    """FilesPipeline whose bodies go socket → hashing writer → ``<path>.part`` → ``<path>``.

    Needs :class:`fetcher.handlers.StreamingDownloadHandler` for http/https,
    and a FILES_STORE that is a local folder, ``s3://``, ``gs://`` or ``ftp://`` (the add-on,
    fetcher.Addon, sets both up). Settings: ``FETCHER_*`` (defaults in fetcher/addon.py), stock's
    FILES_* and MEDIA_ALLOW_REDIRECTS, and RETRY_* through fetcher/retry.py. A pipeline that
    cannot work stops the run (StartupError) rather than being disabled.
    """

    LOG_FAILED_RESULTS = False  # one readable line per failure is logged instead

    def __init__(self, store_uri: str | PathLike[str], *, crawler: Crawler) -> None:
        try:
            super().__init__(store_uri, crawler=crawler)
        except Exception as exc:  # making Scrapy's store: a missing library, a bad URI, no credentials
            raise store_error(str(store_uri), exc) from exc
        if not is_asyncio_available():
            raise StartupError(f"{type(self).__name__} needs the asyncio reactor (TWISTED_REACTOR)")
        s = crawler.settings
        self.target: Target = target_for(self.store, str(store_uri), s)
        self.verify = str(s.get("FETCHER_VERIFY", DEFAULTS["FETCHER_VERIFY"])).lower()
        if self.verify not in _VERIFY_MODES:
            raise StartupError(f"FETCHER_VERIFY must be one of {', '.join(_VERIFY_MODES)}, not {self.verify!r}")
        state = s.get("FETCHER_STATE_DIR", DEFAULTS["FETCHER_STATE_DIR"])
        self.state_dir = Path(state) if state else self.target.state_default
        reports = self.state_dir if isinstance(self.target, RemoteTarget) else self.target.basedir
        self.manifest_path = Path(s.get("FETCHER_MANIFEST") or reports / "manifest.jsonl")
        self.failed_path = Path(s.get("FETCHER_FAILED_LIST") or reports / "failed.txt")
        self.run_id = new_run_id()
        # Opened before the engine starts: a store that cannot work stops the run before it begins.
        if isinstance(self.target, RemoteTarget):
            self.target.check()
        try:
            store_dir = None if isinstance(self.target, RemoteTarget) else self.target.basedir
            self.records: RecordStore | None = RecordStore.open(
                self.state_dir, self.manifest_path, self.failed_path, store_dir)
            self.locks = PathLocks(self.state_dir)
        except OSError as exc:
            raise StartupError(f"cannot open the store's records in {self.state_dir}: {exc.strerror or exc}") from exc
        self.algorithm: str = s.get("FETCHER_ALGORITHM", DEFAULTS["FETCHER_ALGORITHM"])
        try:
            hashlib.new(self.algorithm)  # an unknown name fails at start, not per file
        except ValueError as exc:
            raise StartupError(f"FETCHER_ALGORITHM={self.algorithm!r} is not a hashlib algorithm") from exc
        self.name_query = s.getbool("FETCHER_NAME_QUERY", DEFAULTS["FETCHER_NAME_QUERY"])
        self.layout: str = s.get("FETCHER_LAYOUT", DEFAULTS["FETCHER_LAYOUT"])
        if self.layout not in ("url", "hash"):
            raise StartupError(f"FETCHER_LAYOUT must be 'url' or 'hash', not {self.layout!r}")
        self.max_size = s.getint("FETCHER_MAX_SIZE", DEFAULTS["FETCHER_MAX_SIZE"])
        self.resume = s.getbool("FETCHER_RESUME", DEFAULTS["FETCHER_RESUME"])
        self.revalidate = s.getbool("FETCHER_REVALIDATE", DEFAULTS["FETCHER_REVALIDATE"])
        self.fsync = s.getbool("FETCHER_FSYNC", DEFAULTS["FETCHER_FSYNC"])
        self.keep_empty = s.getbool("FETCHER_EMPTY_FILES", DEFAULTS["FETCHER_EMPTY_FILES"])
        self.split = s.getint("FETCHER_SPLIT", DEFAULTS["FETCHER_SPLIT"])
        self.min_split = s.getint("FETCHER_MIN_SPLIT_SIZE", DEFAULTS["FETCHER_MIN_SPLIT_SIZE"])
        if self.split < 1 or self.min_split < 1:
            raise StartupError("FETCHER_SPLIT and FETCHER_MIN_SPLIT_SIZE must be positive")
        self.retry = RetryPolicy.from_settings(s)
        self.backoff = Backoff(
            s.getfloat("FETCHER_BACKOFF_BASE", DEFAULTS["FETCHER_BACKOFF_BASE"]),
            s.getfloat("FETCHER_BACKOFF_MAX", DEFAULTS["FETCHER_BACKOFF_MAX"]),
            s.getfloat("FETCHER_RETRY_AFTER_MAX", DEFAULTS["FETCHER_RETRY_AFTER_MAX"]),
        )
        self._inflight: dict[str, tuple[str, asyncio.Future[FileRecord]]] = {}
        # Which URL each path of this run belongs to (hashes: ~100 bytes a file on huge lists).
        self._claims: dict[int, int] = {}
        self._turn = -1  # which mirror the next entry with mirrors starts at
        self._transfers: set[asyncio.Future[Response]] = set()
        self._stopping = False
        self._watcher: asyncio.Task[None] | None = None
        crawler.signals.connect(self.store_record, signal=signals.file_finished)
        self._path_needs_response = _overrides(type(self), "file_path")
        self._warn_about_overrides()
        if self.layout == "hash" and s.getpriority("FETCHER_LAYOUT") in (None, SETTINGS_PRIORITIES["addon"]) \
                and self.records.has_paths_outside("full"):
            logger.warning(
                "%s holds files named after their URLs (fetcher's earlier default layout), but FETCHER_LAYOUT "
                "now defaults to 'hash' (stock FilesPipeline's full/<sha1>.<ext>): new files go there. Set "
                "FETCHER_LAYOUT = 'url' in the project's settings to keep the URL names.", self.target.describe())

    def _warn_about_overrides(self) -> None:
        """Say at start which of stock FilesPipeline's hooks a subclass overrides that
        streaming cannot call, and what to override instead (never a silent no-op)."""
        replaced = {
            "file_downloaded": "the body is on disk, not in response.body",
            "media_downloaded": "the body is on disk, not in response.body",
        }
        for name, why in replaced.items():
            if _overrides(type(self), name):
                logger.warning("%s.%s is not called by fetcher's streaming pipeline (%s); override file_stored("
                               "file_info, response, request, info, *, item) instead, which runs once the file is "
                               "in the store", type(self).__name__, name, why)
        store = type(self.store)
        stock_store = FilesPipeline.STORE_SCHEMES.get(next(
            (k for k, v in type(self).STORE_SCHEMES.items() if v is store), ""))
        if stock_store is not None and store is not stock_store:
            logger.warning("%s (STORE_SCHEMES) is not used to write or stat files: fetcher streams into the store "
                           "itself, and its records say which files are complete", store.__name__)

    # -- the run

    async def open_spider(self, spider: Any = None) -> None:
        super().open_spider()
        self._watcher = asyncio.get_running_loop().create_task(self._stop_transfers_on_close())

    async def close_spider(self, spider: Any = None) -> None:
        """Leave the records true for the next run: the manifest with one line per
        URL, failed.txt with the store's failures, a remote store's manifest uploaded."""
        if self._watcher is not None:
            self._watcher.cancel()
        records = self.records
        if records is None:
            return
        self.records = None
        try:
            await asyncio.to_thread(records.compact)
            rerun = self.rerun_hint()
            count = await asyncio.to_thread(
                records.write_failed_list,
                f"# fetcher: the URLs of {self.target.describe()} whose last attempt failed.\n# {rerun}\n")
            if count:
                logger.info("%d URLs of this store are failed (%s); %s", count, self.failed_path, rerun)
            if isinstance(self.target, RemoteTarget) and self.manifest_path.exists():
                try:
                    await asyncio.to_thread(self.target.upload_report, self.manifest_path, "manifest.jsonl")
                except Exception as exc:  # noqa: BLE001 - the local manifest is still complete
                    logger.error("Cannot upload the manifest to %s: %s", self.target.describe(), exc)
        finally:
            records.close()
            if self.locks is not None:
                self.locks.close()

    def rerun_hint(self) -> str:
        """How to try the store's failures again, in the words of how this run was started."""
        spider = self.crawler.spider
        if spider is None or spider.name != "fetch":  # another project's spider: it knows its own items
            name = spider.name if spider is not None else "<spider>"
            return f"Retry them by running `scrapy crawl {name}` again (finished files are skipped)"
        s = self.crawler.settings
        store = f" -s FILES_STORE={shlex.quote(str(s.get('FILES_STORE')))}" \
            if s.getpriority("FILES_STORE") == SETTINGS_PRIORITIES["cmdline"] else ""
        failed = shlex.quote(str(self.failed_path))
        if s.get("FETCHER_INVOKED_AS") == INVOKED_AS:
            return f"Retry them with: {INVOKED_AS} {failed}{store}"
        return f"Retry them with: scrapy crawl fetch -a list={failed}{store}"

    def store_record(self, record: FileRecord) -> None:
        """Every URL's end (this pipeline's files and the spider's bad lines) becomes its current record."""
        if self.records is not None:
            self.records.put(self._stored(record), durable=record.status != "uptodate")

    def _stored(self, record: FileRecord) -> StoredRecord:
        """The store's record of how *record*'s URL ended (its manifest line)."""
        if record.finished_at is None:
            record.finished_at = utc_now()
        has_file = record.status != "failed"
        return StoredRecord(
            url=record.url, status=record.status, path=record.path if has_file else None,
            size=record.size if has_file else None, mtime_ns=record.mtime_ns if has_file else None,
            checksum=record.checksum if has_file else None, algorithm=record.algorithm,
            http_status=record.http_status, attempts=record.attempts, error=record.error, note=record.note,
            mirror=record.mirror if has_file else None, etag=record.etag, last_modified=record.last_modified,
            run=self.run_id, finished_at=record.finished_at,
            entry=None if record.reason == BAD_LINE else record.entry.to_line(),
            fetched_at=(record.fetched_at if record.status == "uptodate" else record.finished_at) if has_file else None,
        )

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
        if self.layout == "hash":
            return super().file_path(request, response, info, item=item)
        return url_to_path(request.url, keep_query=self.name_query)

    def media_to_download(self, request: Request, info: MediaPipeline.SpiderInfo, *,
                          item: Any = None) -> FileInfo | None:
        """Stock's hook to skip a download: a subclass may return a result (its status
        as it says). fetcher's own check (the store's records) runs when it returns None."""
        return None

    def media_failed(self, failure: Failure, request: Request, info: MediaPipeline.SpiderInfo) -> NoReturn:
        """A file that failed (already logged, with its record's reason): the failure is its result."""
        failure.raiseException()

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
                item.record = self._stored(record).manifest()
            if record.status != "failed":
                result: FileInfo = {"url": request.url, "path": record.path or "", "checksum": record.checksum,
                                    "status": record.status}
                if record.response is not None:
                    result = await ensure_awaitable(
                        self.file_stored(result, record.response, request, info, item=item))
                return True, result
            self.media_failed(Failure(FileException(record.error or "failed")), request, info)
            return True, None  # a media_failed that returns: stock's result is None too
        except Exception as exc:  # noqa: BLE001 - a hook's error is this file's result, as in stock
            failure = Failure(exc)
            if errback is not None:
                return True, errback(failure)
            return False, failure

    # -- one file

    async def _fetch_once(self, request: Request, item: Any) -> FileRecord:
        """Fetch a file unless the same path is being fetched already."""
        entry: Entry = request.meta[ENTRY_META]
        try:
            path = self.file_path(request, info=self.spiderinfo, item=item)
        except ValueError as exc:  # a URL no file can be named after (a spider's item, not our list)
            record = FileRecord(entry, "failed", error=f"cannot name a file for {entry.url}: {exc}",
                                reason="bad URL")
            self._finished(record)
            return record
        path = self._settle(path)
        if path in self._inflight and self._inflight[path][0] == entry.url:
            return await asyncio.shield(self._inflight[path][1])  # the same file asked twice: one download
        claim, owner = run_key(path), run_key(urldefrag(entry.url)[0])
        if self._claims.setdefault(claim, owner) != owner:  # another URL of this run has this name
            record = FileRecord(entry, "failed", error=f"another URL of this run is saved to {path}",
                                reason="path conflict")
        else:
            future = asyncio.get_running_loop().create_future()
            self._inflight[path] = (entry.url, future)
            try:
                async with self._owning(path):
                    try:
                        record = await self._fetch(request, entry, path, item)
                    except Exception as exc:  # a bug must not lose the record
                        logger.exception("Unexpected error fetching %s", safe_url(entry.url))
                        record = FileRecord(entry, "failed", error=f"internal error: {exc!r}",
                                            reason="internal error")
                    # Recorded while the path is still ours: another process that takes it
                    # next finds the record, not a file it would have to ask the server about.
                    self._finished(record)
            except _Outcome as outcome:  # stopped while another process had the file
                record = FileRecord(entry, "failed", error=str(outcome), reason=outcome.reason)
                self._finished(record)
            finally:
                del self._inflight[path]
            future.set_result(record)
            return record
        self._finished(record)
        return record

    def _settle(self, path: str) -> str:
        """wget's rule for a name that is also a folder (``/a`` and ``/a/b`` in one
        store): the file is saved as ``<name>/index.html``, like a URL ending in "/"."""
        if isinstance(self.target, RemoteTarget):
            return path
        try:
            return f"{path}/{INDEX_NAME}" if self.target.local_path(path).is_dir() else path
        except ValueError:  # an unsafe path: _fetch says so
            return path

    async def _clear_parents(self, path: str, final: Path) -> None:
        """The other half of the rule: a finished file where a folder is needed moves
        to ``<name>/index.html`` (and its record with it) before this file is written."""
        assert isinstance(self.target, LocalTarget) and self.records is not None
        if final.parent.is_dir():  # the common case: every folder is there, one stat says so
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
                if not local.is_file():  # another process moved it meanwhile
                    continue
                moving = local.with_name(local.name + ".fetcher-moving")
                os.replace(local, moving)
                local.mkdir()
                os.replace(moving, local / INDEX_NAME)
                self.records.move_path(parent, f"{parent}/{INDEX_NAME}")
                logger.info("%s is also a folder now: the file is kept as %s/%s", parent, parent, INDEX_NAME)

    @contextlib.asynccontextmanager
    async def _owning(self, path: str) -> AsyncIterator[None]:
        """Be the only process writing *path*: another fetcher on the same store
        that has it is waited for (it may finish it: the records then say so)."""
        assert self.locks is not None
        waited = False
        while not self.locks.try_acquire(path):
            if not waited:
                logger.debug("Waiting for another process writing %s", path)
                waited = True
            if spider_closing(self.crawler):
                raise _Outcome(f"the run was stopped while another process was writing {path}",
                               reason="stopped", retryable=False)
            await asyncio.sleep(_LOCK_POLL)
        try:
            yield
        finally:
            self.locks.release(path)

    async def _fetch(self, request: Request, entry: Entry, path: str, item: Any) -> FileRecord:
        started = time.monotonic()
        try:
            final = self.target.local_path(path)
        except ValueError as exc:
            return FileRecord(entry, "failed", error=f"unsafe path {path!r}: {exc}", reason="unsafe path")
        if isinstance(self.target, LocalTarget):
            try:
                await self._clear_parents(path, final)
            except OSError as exc:
                return FileRecord(entry, "failed", path=path, error=f"cannot make the folders for {path}: "
                                  f"{exc.strerror or exc}", reason="disk error")
        algorithms: tuple[str, ...] = (self.algorithm,)
        if entry.checksum and entry.checksum.algorithm != self.algorithm:
            algorithms += (entry.checksum.algorithm,)
        record = FileRecord(entry, "failed", path=path, algorithm=self.algorithm)
        writer = HashingWriter(final, entry.url, algorithms, resume=self.resume, max_size=self.max_size,
                               fsync=self.fsync)
        stats = self.crawler.stats
        conditional: dict[str, str] = {}
        free_checks = _END_CHECKS
        last: _Outcome | None = None
        mirrors = self._mirror_order(entry, request)
        retry_times = self.retry.times_for(request.meta)
        at, tried, dead, failures = 0, {mirrors[0]}, set[str](), dict[str, str]()
        try:
            if await self._uptodate(request, final, algorithms, record):
                if not (self.revalidate and (record.etag or record.last_modified)):
                    return record
                conditional = Validators(entry.url, record.etag, record.last_modified).conditional()
            split = entry.split or self.split
            if split > 1 and not conditional and mirrors[at] == request.url:
                response = await self._split_download(request, writer, record, split)
                if response is not None:  # None: the file cannot be split; it is fetched as one stream
                    self._commit(response, writer, record, request, item)
                    if isinstance(self.target, RemoteTarget):
                        await self._upload(writer.final, record)
                    return record
            while True:
                record.attempts += 1
                try:
                    await self._prepare(writer)
                    response = await self._download(request, mirrors[at], writer,
                                                    {**conditional, **writer.range_headers()})
                    if response.status == 304 and conditional:
                        record.http_status = 304
                        return record  # _uptodate filled it in
                    self._complete(response, writer, record, request, item)
                    record.mirror = mirrors[at] if mirrors[at] != entry.url else None
                    if isinstance(self.target, RemoteTarget):
                        await self._upload(writer.final, record)
                    return record
                except _Outcome as outcome:
                    writer.close()
                    record.received = writer.transferred
                    if not outcome.keep_part:
                        writer.discard()
                    if outcome.free and free_checks:  # part of this attempt: ask again at once
                        free_checks -= 1
                        record.attempts -= 1
                        continue
                    if outcome.reason == "stopped" and last is not None:  # say what happened before
                        outcome = _Outcome(f"{last}; the run stopped before another attempt", reason="stopped",
                                           retryable=False, http_status=last.http_status)
                    record.http_status = outcome.http_status
                    last = outcome
                    if len(mirrors) > 1 and outcome.reason != "stopped":
                        # Fail over: the next mirror at once, the same one again only after a backoff.
                        failures[mirrors[at]] = str(outcome)
                        if not outcome.retryable:
                            dead.add(mirrors[at])
                        following = [(at + i) % len(mirrors) for i in range(1, len(mirrors) + 1)]
                        alive = [i for i in following if mirrors[i] not in dead]
                        if not alive or record.attempts > retry_times + len(mirrors) - 1:
                            record.status, record.reason = "failed", outcome.reason
                            record.error = "every mirror failed: " + "; ".join(
                                f"{safe_url(u)}: {why}" for u, why in failures.items())
                            return record
                        if alive[0] != at and not entry.checksum:
                            writer.discard()  # bytes of two mirrors are spliced only when a checksum checks them
                        at = alive[0]
                        if mirrors[at] not in tried:
                            tried.add(mirrors[at])
                            logger.debug("Trying %s's mirror %s: %s", safe_url(entry.url), safe_url(mirrors[at]),
                                         outcome)
                            continue
                    elif not (outcome.retryable and record.attempts <= retry_times):
                        if outcome.retryable:
                            stats.inc_value("retry/max_reached")
                        record.status, record.error, record.reason = "failed", str(outcome), outcome.reason
                        return record
                    delay = self.backoff.delay(record.attempts, outcome.retry_after)
                    logger.debug("Retrying %s in %.1f s (attempt %d of %d): %s",
                                 safe_url(entry.url), delay, record.attempts + 1, retry_times + 1, outcome)
                    stats.inc_value("retry/count")
                    stats.inc_value(f"retry/reason_count/{_stats_reason(outcome)}")
                    stats.inc_value("fetcher/retry_waiting")
                    try:
                        await self._wait(delay)
                    finally:
                        stats.inc_value("fetcher/retry_waiting", -1)
        except _Outcome as outcome:  # before any request: the file on disk cannot be read
            record.status, record.error, record.reason = "failed", str(outcome), outcome.reason
            return record
        finally:
            writer.close()
            record.elapsed = time.monotonic() - started

    async def _uptodate(self, request: Request, final: Path, algorithms: tuple[str, ...],
                        record: FileRecord) -> bool:
        """Whether this URL's file is complete in the store already: the one place that decides.

        A file this store recorded is up to date while its size and mtime are
        the recorded ones (a stat; FETCHER_VERIFY=full re-hashes it too) and it
        matches the list's checksum. A file with no record of this URL (another
        tool's, or a lost record) is trusted only when it matches the list's
        checksum or, without one, the server's size and Last-Modified (HEAD).
        Fills *record* when it is; sets ``record.note`` when a file is replaced.
        """
        assert self.records is not None
        prior = self.records.lookup(record.url)
        if prior is not None and not (prior.has_file and prior.path == record.path):
            prior = None
        if isinstance(self.target, RemoteTarget):
            return await self._uptodate_remote(prior, record)
        try:
            st = os.stat(final)
        except OSError:
            if prior is not None:
                record.note = f"{record.path} was recorded by run {prior.run} but is missing; fetched again"
            return False
        expected = record.entry.checksum
        digests: dict[str, str] = {}
        if prior is not None:
            if (st.st_size, st.st_mtime_ns) != (prior.size, prior.mtime_ns):
                return self._replace(record, f"{record.path} changed on disk since run {prior.run} recorded it "
                                             f"({_differences(st, prior)}); fetched again")
            assert prior.algorithm is not None and prior.checksum is not None
            digests[prior.algorithm] = prior.checksum
            if self.verify == "full" or any(a not in digests for a in algorithms):
                _, found = await self._hash(final, tuple({*algorithms, prior.algorithm}))
                if found[prior.algorithm] != prior.checksum:
                    return self._replace(record, f"{record.path} does not match the {prior.algorithm} recorded by "
                                                 f"run {prior.run} (found {found[prior.algorithm]}); fetched again")
                digests = found
            record.etag, record.last_modified = prior.etag, prior.last_modified
            if self._fetched_long_ago(record, prior):
                return False
        elif self._expired(st.st_mtime):  # another tool's file: its age is its mtime, as stock counts it
            record.note = f"{record.path} on disk is older than FILES_EXPIRES ({self.expires} days); fetched again"
            return False
        elif expected is not None:
            _, digests = await self._hash(final, algorithms)
            record.note = f"found on disk without a record; it matches the list's {expected.algorithm}"
        else:
            why = await self._server_disagrees(request, st, record)
            if why:
                return self._replace(record, f"{record.path} was on disk without a record and {why}; fetched again")
            _, digests = await self._hash(final, algorithms)
            record.note = "found on disk without a record; its size and date match the server's"
        if expected and digests[expected.algorithm] != expected.hexdigest:
            logger.warning("%s is on disk but does not match %s; downloading it again", final, expected)
            record.note = f"{record.path} did not match the list's {expected.algorithm}; fetched again"
            return False
        record.status, record.size, record.checksum = "uptodate", st.st_size, digests[self.algorithm]
        record.mtime_ns = st.st_mtime_ns
        return True

    async def _uptodate_remote(self, prior: StoredRecord | None, record: FileRecord) -> bool:
        """A remote object is up to date when a HEAD shows the size and digest fetcher
        stored with it; on a store without object metadata (FTP), when its size is the
        one this store's records hold for the URL, whose digest is then reported."""
        assert isinstance(self.target, RemoteTarget) and record.path is not None
        try:
            found = await asyncio.to_thread(self.target.head, record.path)
        except Exception as exc:  # noqa: BLE001 - a store that cannot answer: fetch and upload again
            logger.warning("Cannot check %s in %s: %s", record.path, self.target.describe(), exc)
            return False
        expected = record.entry.checksum
        if found is None:
            if prior is not None:
                record.note = (f"{record.path} was recorded by run {prior.run} but is missing from the store; "
                               "fetched again")
            return False
        if not self.target.OBJECT_DIGESTS:  # only the records know the digest: they must vouch for the object
            if prior is None:
                return self._replace(record, f"{record.path} is in the store without a record of this URL; "
                                             "fetched again")
            if found.size != prior.size:
                return self._replace(record, f"{record.path} in the store is not the object run {prior.run} recorded "
                                             f"({found.size} bytes, recorded {prior.size}); fetched again")
            found = RemoteObject(found.size, prior.algorithm, prior.checksum)
        if found.checksum is None or found.algorithm != self.algorithm:
            if prior is not None:
                record.note = (f"{record.path} in the store has no {self.algorithm} digest of fetcher's "
                               "(another tool's object, or another FETCHER_ALGORITHM); fetched again")
            return False
        if prior is not None and (prior.size, prior.checksum) != (found.size, found.checksum):
            return self._replace(record, f"{record.path} in the store is not the object run {prior.run} recorded; "
                                         "fetched again")
        if expected is not None and (expected.algorithm != found.algorithm or expected.hexdigest != found.checksum):
            return self._replace(record, f"{record.path} in the store does not match the list's checksum; "
                                         "fetched again")
        if prior is not None:
            record.etag, record.last_modified = prior.etag, prior.last_modified
            if self._fetched_long_ago(record, prior):
                return False
        record.status, record.size, record.checksum = "uptodate", found.size, found.checksum
        return True

    def _fetched_long_ago(self, record: FileRecord, prior: StoredRecord) -> bool:
        """FILES_EXPIRES: a file whose bytes came more than that many days ago is fetched again."""
        record.fetched_at = prior.fetched_at or prior.finished_at
        if not self._expired(record.fetched_at):
            return False
        record.note = f"{record.path} was fetched more than FILES_EXPIRES ({self.expires} days) ago; fetched again"
        return True

    def _expired(self, when: str | float | None) -> bool:
        """Older than FILES_EXPIRES days (stock's rule; 0: always), from a record's
        time or a file's mtime. A record without a time never expires."""
        if when is None:
            return False
        stamp = when if isinstance(when, float) else datetime.fromisoformat(when).timestamp()
        return (time.time() - stamp) / 86400 > self.expires

    @staticmethod
    def _replace(record: FileRecord, note: str) -> bool:
        logger.warning("%s", note)
        record.note = note
        return False

    async def _hash(self, final: Path, algorithms: tuple[str, ...]) -> tuple[int, dict[str, str]]:
        try:
            return await asyncio.to_thread(hash_file, final, algorithms)
        except OSError as exc:
            raise _Outcome(f"cannot read {final}: {exc.strerror or exc}", reason="disk error",
                           retryable=False) from exc

    async def _server_disagrees(self, request: Request, st: os.stat_result, record: FileRecord) -> str | None:
        """Ask the server (HEAD) whether a file found on disk is its current file:
        the same length, and not older than its Last-Modified. Returns why not."""
        head = request.replace(method="HEAD", headers={**request.headers.to_unicode_dict(),
                                                       "Accept-Encoding": "identity"},
                               meta={**request.meta, "dont_retry": True})
        try:
            response = await self.crawler.engine.download_async(head)
        except Exception as exc:  # noqa: BLE001 - cannot ask: fetch it
            return f"the server could not be asked ({exc})"
        length = response.headers.get("Content-Length")
        if response.status != 200 or length is None or not length.strip().isdigit():
            return f"the server's HEAD gave HTTP {response.status} with no length to compare"
        if int(length) != st.st_size:
            return f"its size ({st.st_size}) is not the server's ({int(length)})"
        modified = (response.headers.get("Last-Modified") or b"").decode("latin-1")
        with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
            if modified and parsedate_to_datetime(modified).timestamp() > st.st_mtime + 1:
                return "the server's copy is newer"
        record.etag = (response.headers.get("ETag") or b"").decode("latin-1") or None
        record.last_modified = modified or None
        return None

    async def _prepare(self, writer: HashingWriter) -> None:
        try:
            if self.resume and writer.part.exists():  # hashing a kept prefix is disk work: off the loop
                await asyncio.to_thread(writer.prepare)
            else:  # nothing to read: not worth a thread hop per file
                writer.prepare()
        except OSError as exc:  # an unreadable .part: nothing a retry can fix
            raise _Outcome(f"cannot read {writer.part}: {exc.strerror or exc}", reason="disk error",
                           retryable=False, keep_part=False) from exc

    async def _wait(self, delay: float) -> None:
        """Sleep out a backoff, but wake up when the run is being stopped (Ctrl-C)."""
        deadline = time.monotonic() + delay
        while not spider_closing(self.crawler) and (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, _STOP_POLL))

    def _mirror_order(self, entry: Entry, request: Request) -> tuple[str, ...]:
        """The URLs to try, in order: the entry's mirrors, each entry starting at
        the next one, so that concurrent files spread over the mirrors."""
        if request.url != entry.url or not entry.mirrors:
            return (request.url,)
        urls = entry.urls
        self._turn += 1
        start = self._turn % len(urls)
        return urls[start:] + urls[:start]

    async def _download(self, request: Request, url: str, sink: Sink, extra: dict[str, str]) -> Response:
        """One attempt of *request* from *url* into *sink*, with *extra* headers (Range, conditions)."""
        if spider_closing(self.crawler):  # Ctrl-C, CLOSESPIDER_*: start nothing new; a rerun resumes
            raise _Outcome("the run was stopped before this file was fetched", reason="stopped", retryable=False)
        headers = dict(request.headers.to_unicode_dict())
        headers["Accept-Encoding"] = "identity"  # the bytes the server has, not a re-encoding
        headers.update(extra)
        attempt = request.replace(
            url=url,
            headers=headers,
            meta={**request.meta, SINK_META: sink, "dont_retry": True,
                  **({} if self.allow_redirects else {"dont_redirect": True})},
        )
        # The handler holds a transfer slot (CONCURRENT_REQUESTS) only while bytes can flow:
        # neither a request queued behind its host's limit nor a backoff holds one.
        transfer = asyncio.ensure_future(self.crawler.engine.download_async(attempt))
        self._transfers.add(transfer)
        try:
            return await transfer
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            raise _Outcome("the run was stopped during the transfer (its .part is kept: a rerun resumes it)",
                           reason="stopped", retryable=False) from None
        except Exception as exc:  # the handler's, the writer's or a middleware's error: the policy says
            raise _Outcome.of(self.retry.classify(Attempt(error=exc))) from exc
        finally:
            self._transfers.discard(transfer)

    async def _split_download(self, request: Request, writer: HashingWriter, record: FileRecord,
                              split: int) -> Response | None:
        """aria2's ``split=``: fetch the file as up to *split* ranges at once (each its own
        transfer, counted in CONCURRENT_REQUESTS and the host's limit, each resumed on a
        retry or in a later run), then hash the whole ``.part``. Returns the response that
        announced the file, or None when it cannot be split (no ranges, too small, no HEAD)."""
        head = await self._head(request)
        if head is None:
            return None
        length = int(head.headers[b"Content-Length"])
        if b"bytes" not in (head.headers.get(b"Accept-Ranges") or b"").lower() or length < 2 * self.min_split:
            return None
        headers = {k: (head.headers.get(k) or b"").decode("latin-1") or None for k in ("ETag", "Last-Modified")}
        validators = Validators(record.url, headers["ETag"], headers["Last-Modified"], length)
        if not validators.if_range():
            return None  # nothing to tell a changed file by: its ranges must not be combined
        state = SegmentState.resume_or_start(writer.final, validators, split, self.min_split)
        if state.received == 0:
            writer.discard()  # a single stream's .part, if any, is not these segments'
        try:
            fd = state.open()
        except OSError as exc:
            raise _Outcome(f"cannot write {state.part}: {exc.strerror or exc}", reason="disk error",
                           retryable=False) from exc
        before, record.attempts = state.received, 1
        try:
            async with asyncio.TaskGroup() as segments:  # the first segment that fails stops the others
                for segment in state.segments:
                    if not segment.complete:
                        segments.create_task(self._fetch_segment(request, fd, state, segment, record))
        except* _Outcome as failed:
            raise failed.exceptions[0] from None
        finally:
            os.close(fd)
            record.received = state.received - before
            state.save()
        await asyncio.to_thread(writer.adopt, validators)
        state.remove()
        record.http_status = head.status
        return head

    async def _fetch_segment(self, request: Request, fd: int, state: SegmentState, segment: Segment,
                             record: FileRecord) -> None:
        """One segment, retried as a file is (each retry counts in the record's attempts).
        A final failure is the file's (_Outcome): the segments' bytes stay for a resume."""
        retries, times = 0, self.retry.times_for(request.meta)
        while True:
            sink = SegmentSink(fd, state.part, segment, state.validators)
            extra = {"Range": segment.range_header(), "If-Range": state.validators.if_range() or ""}
            try:
                response = await self._download(request, request.url, sink, extra)
                verdict = self.retry.classify(Attempt(status=response.status, streamed=STREAMED_FLAG in response.flags,
                                                      flags=frozenset(response.flags), resumed=True))
                if verdict.action is not Action.DONE:
                    outcome = _Outcome.of(verdict, response.status)
                elif segment.complete:
                    return
                else:  # a short body taken as whole (DOWNLOAD_FAIL_ON_DATALOSS=False): the rest is still due
                    outcome = _Outcome(f"the segment ended at byte {segment.next} of {segment.end}",
                                       reason="length mismatch", retryable=True, http_status=response.status)
            except _Outcome as raised:
                outcome = raised
            if not outcome.retryable or retries >= times:
                if not outcome.keep_part:
                    segment.done = 0
                raise _Outcome(f"segment {segment.start}-{segment.end - 1}: {outcome}", reason=outcome.reason,
                               retryable=False, http_status=outcome.http_status)
            retries += 1
            record.attempts += 1
            self.crawler.stats.inc_value("retry/count")
            await self._wait(self.backoff.delay(retries, outcome.retry_after))

    async def _head(self, request: Request) -> Response | None:
        """The server's HEAD for *request*, if it answers 200 with a length."""
        head = request.replace(method="HEAD", headers={**request.headers.to_unicode_dict(),
                                                       "Accept-Encoding": "identity"},
                               meta={**request.meta, "dont_retry": True})
        try:
            response = await self.crawler.engine.download_async(head)
        except Exception:  # noqa: BLE001 - no HEAD: the file is fetched as one stream
            return None
        length = (response.headers.get(b"Content-Length") or b"").strip()
        return response if response.status == 200 and length.isdigit() else None

    async def _stop_transfers_on_close(self) -> None:
        """A stopped run (Ctrl-C, CLOSESPIDER_*) ends within seconds even with large
        files in flight: their transfers are cut and their .part files kept for the rerun."""
        while not self.crawler.engine.running:  # the pipeline opens before the engine runs
            await asyncio.sleep(_STOP_POLL)
        while not spider_closing(self.crawler):
            await asyncio.sleep(_STOP_POLL)
            if self.records is not None:  # confirmations do not wait for the next record (see RecordStore.put)
                self.records.flush()
        self._stopping = True
        if self._transfers:
            logger.info("Stopping: cutting %d transfers in flight; their .part files are kept, and a rerun "
                        "resumes them (no second Ctrl-C needed)", len(self._transfers))
        for transfer in list(self._transfers):
            transfer.cancel()

    def _complete(self, response: Response, writer: HashingWriter, record: FileRecord, request: Request,
                  item: Any) -> None:
        """Judge a response: commit the file, or raise the _Outcome to act on."""
        status = response.status
        record.http_status = status
        flags = frozenset(response.flags)
        retry_after = None
        if status in (429, 503):
            retry_after = retry_after_seconds((response.headers.get("Retry-After") or b"").decode("latin-1"),
                                              time.time())
        part_complete = writer.is_complete_part(status, response.headers)
        verdict = self.retry.classify(Attempt(
            status=status, streamed=STREAMED_FLAG in flags, flags=flags, resumed=bool(writer.offset),
            part_complete=part_complete, retry_after=retry_after,
            # No length and the connection closed: a reset looks the same as the end.
            unverified_end=UNVERIFIED_END_FLAG in flags and writer.resumable(),
        ))
        if verdict.action is not Action.DONE:
            raise _Outcome.of(verdict, status)
        cached = CACHED_FLAG in flags
        if cached:  # Scrapy's HTTP cache answered: its body is in memory
            self._write_body(writer, response)
        elif part_complete:
            writer.size = writer.offset  # nothing was missing: the kept part is the whole file
        record.received = 0 if cached else writer.transferred
        self._commit(response, writer, record, request, item)

    def _commit(self, response: Response, writer: HashingWriter, record: FileRecord, request: Request,
                item: Any) -> None:
        """A complete body: check it (empty, checksum), name it, and move it into place."""
        status, cached = response.status, CACHED_FLAG in response.flags
        if writer.size == 0 and not self.keep_empty:
            raise _Outcome("empty body (stock FilesPipeline refuses empty files; FETCHER_EMPTY_FILES=True keeps them)",
                           reason="empty-content", retryable=False, http_status=status, keep_part=False)
        digests = writer.hexdigests()
        expected = record.entry.checksum
        if expected and digests[expected.algorithm] != expected.hexdigest:
            raise _Outcome(
                f"checksum mismatch: expected {expected.algorithm} {expected.hexdigest}, "
                f"got {digests[expected.algorithm]}",
                reason="checksum mismatch", retryable=False, http_status=status, keep_part=False,
            )
        first = writer.final
        if self._path_needs_response:  # a subclass's file_path that may name the file after its response
            self._rename(writer, record, self.file_path(request, response, self.spiderinfo, item=item))
        if writer.final.is_dir():  # its name became a folder while it was downloaded (see _settle)
            writer.final, record.path = writer.final / INDEX_NAME, f"{record.path}/{INDEX_NAME}"
        try:
            st = writer.commit()
        except BodyError as exc:
            raise _Outcome(str(exc), reason=reason_of(exc), retryable=False, http_status=status,
                           keep_part=False) from exc
        record.status, record.size, record.checksum = "cached" if cached else "downloaded", writer.size, \
            digests[self.algorithm]
        record.mtime_ns, record.response = st.st_mtime_ns, response
        if writer.final != first and isinstance(self.target, LocalTarget):
            self.target.prune(first.parent)
        if DATALOSS_FLAG in response.flags:
            record.note = (f"kept short: the connection ended after {writer.size} bytes of "
                           f"{writer.expected_size} (DOWNLOAD_FAIL_ON_DATALOSS=False)")
        if writer.validators is not None:
            record.etag, record.last_modified = writer.validators.etag, writer.validators.last_modified

    @staticmethod
    def _write_body(writer: HashingWriter, response: Response) -> None:
        """A body that is in memory (Scrapy's HTTP cache) goes through the writer like a streamed one."""
        headers = response.headers.copy()
        headers.pop(b"Content-Length", None)  # the cache's body may be decoded: its length is the body's
        try:
            writer.begin(200, headers)
            writer.write(response.body)
            writer.finish()
        except BodyError as exc:
            raise _Outcome(str(exc), reason=reason_of(exc), retryable=False, keep_part=False) from exc

    def _rename(self, writer: HashingWriter, record: FileRecord, path: str) -> None:
        """Name the file as a subclass's file_path does once it sees the response."""
        if path == record.path:
            return
        try:
            writer.final = self.target.local_path(path)
            writer.final.parent.mkdir(parents=True, exist_ok=True)
        except ValueError as exc:
            raise _Outcome(f"unsafe path {path!r}: {exc}", reason="unsafe path", retryable=False,
                           keep_part=False) from exc
        except OSError as exc:
            raise _Outcome(f"cannot make the folders for {path}: {exc.strerror or exc}", reason="disk error",
                           retryable=False, keep_part=False) from exc
        record.path = path

    async def _upload(self, local: Path, record: FileRecord) -> None:
        """Upload a verified file from the spool; retried with backoff, and never
        recorded as downloaded unless the store took it. The spool copy goes either way."""
        assert isinstance(self.target, RemoteTarget) and record.path and record.checksum and record.size is not None
        try:
            for attempt in range(1, self.retry.times + 2):
                try:
                    await asyncio.to_thread(self.target.upload, local, record.path, record.size,
                                            self.algorithm, record.checksum)
                    return
                except Exception as exc:  # noqa: BLE001 - every store's client raises many kinds
                    if attempt > self.retry.times or spider_closing(self.crawler):
                        record.status, record.reason = "failed", "upload failed"
                        record.error = f"upload to {self.target.describe()} failed: {exc}"
                        return
                    logger.debug("Retrying the upload of %s (attempt %d): %s", record.path, attempt + 1, exc)
                    await self._wait(self.backoff.delay(attempt))
        finally:
            with contextlib.suppress(OSError):
                local.unlink()

    def _finished(self, record: FileRecord) -> None:
        if record.status == "failed":
            logger.error("Failed %s: %s", safe_url(record.url), record.error)
        self.inc_stats(record.status)
        self.crawler.signals.send_catch_log(signals.file_finished, record=record)


def _stats_reason(outcome: _Outcome) -> str:
    """The reason in Scrapy's ``retry/reason_count/*`` stats: the exception's
    class path, or ``503 Service Unavailable`` for an HTTP status."""
    if outcome.__cause__ is not None:
        return global_object_name(type(outcome.__cause__))
    if outcome.http_status is not None and outcome.reason.startswith("HTTP"):
        return response_status_message(outcome.http_status)
    return outcome.reason


def _differences(st: os.stat_result, prior: StoredRecord) -> str:
    """What a stat shows changed in a recorded file, for the record's note."""
    found = []
    if st.st_size != prior.size:
        found.append(f"{st.st_size} bytes, recorded {prior.size}")
    if st.st_mtime_ns != prior.mtime_ns:
        found.append("another modification time")
    return ", ".join(found)


def _entry_request(entry: Entry) -> Request:
    return Request(entry.url, callback=NO_CALLBACK, headers=_entry_headers(entry), meta={ENTRY_META: entry})


def _entry_headers(entry: Entry) -> dict[str, str]:
    """The list's per-entry headers (``header=``, ``referer=``, ``user-agent=``)."""
    headers = dict(entry.headers)
    if entry.referer is not None:
        headers["Referer"] = entry.url if entry.referer == "*" else entry.referer
    if entry.user_agent is not None:
        headers["User-Agent"] = entry.user_agent
    return headers


def _overrides(cls: type, name: str) -> bool:
    """Whether a subclass of fetcher's pipeline defines its own *name*."""
    return getattr(cls, name) is not getattr(StreamingFilesPipeline, name)
