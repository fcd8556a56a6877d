"""A FilesPipeline that streams every file to disk instead of holding it in memory.

It keeps stock FilesPipeline's contract (``file_urls`` in, ``files`` out with
``url``/``path``/``checksum``/``status``), so any spider can use it; and it owns
each file's whole life: skip it when it is complete already, resume its
``.part``, retry with backoff while holding no concurrency slot, check the
expected checksum, rename it into place, and tell the manifest how it ended.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from itemadapter import ItemAdapter
from scrapy.exceptions import (
    CannotResolveHostError,
    DownloadConnectionRefusedError,
    DownloadFailedError,
    DownloadTimeoutError,
    IgnoreRequest,
    NotConfigured,
    ResponseDataLossError,
)
from scrapy.http import Request, Response
from scrapy.http.request import NO_CALLBACK
from scrapy.pipelines.files import FilesPipeline, FSFilesStore
from scrapy.utils.asyncio import is_asyncio_available
from scrapy.utils.misc import load_object
from twisted.python.failure import Failure

from fetcher import settings as defaults
from fetcher import signals
from fetcher._scrapy_private import spider_closing
from fetcher.backoff import Backoff, retry_after_seconds
from fetcher.handlers import SINK_META, STREAMED_FLAG, UNVERIFIED_END_FLAG, StallTimeoutError, TLSError
from fetcher.items import FileRecord, run_key
from fetcher.middlewares import RedirectLoopError
from fetcher.naming import resolve_in_store, url_to_path
from fetcher.urllist import Entry
from fetcher.writer import (
    BodyError,
    FileTooLarge,
    HashingWriter,
    LengthMismatch,
    ResumeMismatch,
    StorageError,
    hash_file,
    load_validators,
)

if TYPE_CHECKING:
    from os import PathLike

    from scrapy.crawler import Crawler
    from scrapy.pipelines.media import FileInfoOrError, MediaPipeline

logger = logging.getLogger(__name__)

ENTRY_META = "fetcher_entry"
_END_CHECKS = 3  # Range requests that may confirm the end of a body that had no length
_STOP_POLL = 0.5  # seconds: how soon a backoff notices that the run is being stopped


class _Outcome(Exception):
    """One attempt's end, as something to retry or give up on."""

    def __init__(self, message: str, *, reason: str, retryable: bool, http_status: int | None = None,
                 retry_after: float | None = None, keep_part: bool = True, free: bool = False) -> None:
        super().__init__(message)
        self.free = free  # a check, not a failure: asked again at once, not counted as a retry
        self.reason = reason
        self.retryable = retryable
        self.http_status = http_status
        self.retry_after = retry_after
        self.keep_part = keep_part


class StreamingFilesPipeline(FilesPipeline):
    """FilesPipeline whose bodies go socket → hashing writer → ``<path>.part`` → ``<path>``.

    Needs :class:`fetcher.handlers.StreamingDownloadHandler` for http/https and
    a local FILES_STORE. Settings: see ``fetcher/settings.py`` (``FETCHER_*``)
    and RETRY_TIMES / RETRY_HTTP_CODES / RETRY_EXCEPTIONS, which it applies itself.
    """

    LOG_FAILED_RESULTS = False  # one readable line per failure is logged instead

    def __init__(self, store_uri: str | PathLike[str], *, crawler: Crawler) -> None:
        super().__init__(store_uri, crawler=crawler)
        if not isinstance(self.store, FSFilesStore):
            raise NotConfigured(f"{type(self).__name__} streams to a local FILES_STORE, not {store_uri}")
        if not is_asyncio_available():
            raise NotConfigured(f"{type(self).__name__} needs the asyncio reactor")
        s = crawler.settings
        self.store_dir = Path(self.store.basedir)
        self.algorithm: str = s.get("FETCHER_ALGORITHM", defaults.FETCHER_ALGORITHM)
        hashlib.new(self.algorithm)  # an unknown name fails at start, not per file
        self.layout: str = s.get("FETCHER_LAYOUT", defaults.FETCHER_LAYOUT)
        if self.layout not in ("url", "hash"):
            raise ValueError(f"FETCHER_LAYOUT must be 'url' or 'hash', not {self.layout!r}")
        self.max_size = s.getint("FETCHER_MAX_SIZE", defaults.FETCHER_MAX_SIZE)
        self.resume = s.getbool("FETCHER_RESUME", defaults.FETCHER_RESUME)
        self.revalidate = s.getbool("FETCHER_REVALIDATE", defaults.FETCHER_REVALIDATE)
        self.fsync = s.getbool("FETCHER_FSYNC", defaults.FETCHER_FSYNC)
        self.retry_times = s.getint("RETRY_TIMES") if s.getbool("RETRY_ENABLED") else 0
        self.retry_codes = {int(c) for c in s.getlist("RETRY_HTTP_CODES")}
        self.retry_exceptions = tuple(
            load_object(x) if isinstance(x, str) else x for x in s.getlist("RETRY_EXCEPTIONS")
        )
        self.backoff = Backoff(
            s.getfloat("FETCHER_BACKOFF_BASE", defaults.FETCHER_BACKOFF_BASE),
            s.getfloat("FETCHER_BACKOFF_MAX", defaults.FETCHER_BACKOFF_MAX),
            s.getfloat("FETCHER_RETRY_AFTER_MAX", defaults.FETCHER_RETRY_AFTER_MAX),
        )
        self._inflight: dict[str, tuple[str, asyncio.Future[FileRecord]]] = {}
        # Which URL each path of this run belongs to (hashes: ~100 bytes a file on huge lists).
        self._claims: dict[int, int] = {}

    # -- stock FilesPipeline hooks

    def get_media_requests(self, item: Any, info: MediaPipeline.SpiderInfo) -> list[Request]:
        adapter = ItemAdapter(item)
        entries: list[Entry] = list(adapter.get("fetcher_entries") or [])
        by_url = {e.url: e for e in entries}
        return [
            Request(r.url, callback=NO_CALLBACK, meta={ENTRY_META: by_url.get(r.url, Entry(r.url, 0))})
            for r in super().get_media_requests(item, info)
        ]

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
        return url_to_path(request.url)

    async def process_item(self, item: Any, spider: Any = None) -> Any:
        requests = self.get_media_requests(item, self.spiderinfo)
        records = await asyncio.gather(*(self._fetch_once(r, item) for r in requests))
        results = cast("list[FileInfoOrError]", [
            (True, {"url": r.url, "path": r.path, "checksum": r.checksum, "status": r.status})
            if r.status != "failed"
            else (False, Failure(IgnoreRequest(r.error)))
            for r in records
        ])
        return self.item_completed(results, item, self.spiderinfo)

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
        if path in self._inflight and self._inflight[path][0] == entry.url:
            return await asyncio.shield(self._inflight[path][1])  # the same file asked twice: one download
        claim, owner = run_key(path), run_key(entry.url)
        if self._claims.setdefault(claim, owner) != owner:  # another URL of this run has this name
            record = FileRecord(entry, "failed", error=f"another URL of this run is saved to {path}",
                                reason="path conflict")
        else:
            future = asyncio.get_running_loop().create_future()
            self._inflight[path] = (entry.url, future)
            try:
                record = await self._fetch(request, entry, path)
            except Exception as exc:  # a bug must not lose the record
                logger.exception("Unexpected error fetching %s", entry.url)
                record = FileRecord(entry, "failed", error=f"internal error: {exc!r}", reason="internal error")
            finally:
                del self._inflight[path]
            future.set_result(record)
        self._finished(record)
        return record

    async def _fetch(self, request: Request, entry: Entry, path: str) -> FileRecord:
        started = time.monotonic()
        try:
            final = resolve_in_store(self.store_dir, path)
        except ValueError as exc:
            return FileRecord(entry, "failed", error=f"unsafe path {path!r}: {exc}", reason="unsafe path")
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
        try:
            if final.is_file():
                if await self._uptodate(final, algorithms, record):
                    if not (self.revalidate and (validators := load_validators(final, entry.url))):
                        return record
                    conditional = validators.conditional()
            while True:
                record.attempts += 1
                try:
                    await self._prepare(writer)
                    response = await self._download(request, writer, conditional)
                    if response.status == 304 and conditional:
                        record.http_status = 304
                        return record  # _uptodate filled it in
                    self._complete(response, writer, record)
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
                    if not (outcome.retryable and record.attempts <= self.retry_times):
                        record.status, record.error, record.reason = "failed", str(outcome), outcome.reason
                        return record
                    delay = self.backoff.delay(record.attempts, outcome.retry_after)
                    logger.debug("Retrying %s in %.1f s (attempt %d of %d): %s",
                                 entry.url, delay, record.attempts + 1, self.retry_times + 1, outcome)
                    stats.inc_value("retry/count")
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

    async def _uptodate(self, final: Path, algorithms: tuple[str, ...], record: FileRecord) -> bool:
        """A file already at its final name is complete (only complete files get
        there); it counts as up to date unless it fails the list's checksum."""
        try:
            size, digests = await asyncio.to_thread(hash_file, final, algorithms)
        except OSError as exc:
            raise _Outcome(f"cannot read {final}: {exc.strerror or exc}", reason="disk error",
                           retryable=False) from exc
        expected = record.entry.checksum
        if expected and digests[expected.algorithm] != expected.hexdigest:
            logger.warning("%s is on disk but does not match %s; downloading it again", final, expected)
            return False
        record.status, record.size, record.checksum = "uptodate", size, digests[self.algorithm]
        return True

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

    async def _download(self, request: Request, writer: HashingWriter, conditional: dict[str, str]) -> Response:
        if spider_closing(self.crawler):  # Ctrl-C, CLOSESPIDER_*: start nothing new; a rerun resumes
            raise _Outcome("the run was stopped before this file was fetched", reason="stopped", retryable=False)
        headers = dict(request.headers.to_unicode_dict())
        headers["Accept-Encoding"] = "identity"  # the bytes the server has, not a re-encoding
        headers.update(conditional)
        headers.update(writer.range_headers())
        attempt = request.replace(
            headers=headers,
            meta={**request.meta, SINK_META: writer, "dont_retry": True},
        )
        try:
            # The handler holds a transfer slot (CONCURRENT_REQUESTS) only while bytes can flow:
            # neither a request queued behind its host's limit nor a backoff holds one.
            return await self.crawler.engine.download_async(attempt)
        except BodyError as exc:
            # A resume that went wrong starts over from byte 0; other kept bytes stay.
            raise _Outcome(str(exc), reason=_reason(exc), retryable=exc.retryable,
                           keep_part=exc.retryable and not isinstance(exc, ResumeMismatch)) from exc
        except self.retry_exceptions as exc:
            raise _Outcome(str(exc) or type(exc).__name__, reason=_reason(exc), retryable=True) from exc
        except Exception as exc:  # IgnoreRequest (redirect loops), TLS, unsupported: final
            raise _Outcome(str(exc) or type(exc).__name__, reason=_reason(exc), retryable=False) from exc

    def _complete(self, response: Response, writer: HashingWriter, record: FileRecord) -> None:
        """Judge a response: commit the file, or raise the _Outcome to act on."""
        status = response.status
        record.http_status = status
        if writer.is_complete_part(status, response.headers):
            writer.size = writer.offset  # nothing was missing: the kept part is the whole file
        elif status == 416 and writer.offset:  # the kept part is not a prefix of the file: start over
            raise _Outcome("the server refused to resume (HTTP 416)", reason="bad resume", retryable=True,
                           http_status=status, keep_part=False, free=True)
        elif STREAMED_FLAG not in response.flags and 200 <= status < 300:
            raise _Outcome(f"HTTP {status} but the body was not streamed: DOWNLOAD_HANDLERS must map this scheme "
                           "to fetcher.handlers.StreamingDownloadHandler", reason="not streamed",
                           retryable=False, http_status=status)
        elif STREAMED_FLAG not in response.flags:
            retry_after = None
            if status in (429, 503):
                retry_after = retry_after_seconds((response.headers.get("Retry-After") or b"").decode("latin-1"),
                                                  time.time())
            raise _Outcome(f"HTTP {status}", reason=f"HTTP {status}", retryable=status in self.retry_codes,
                           http_status=status, retry_after=retry_after)
        elif UNVERIFIED_END_FLAG in response.flags and writer.resumable():
            # No length and the connection closed: a reset looks the same as the end.
            # Ask for the bytes after it; a 416 says there are none.
            raise _Outcome("the body ended with the connection and no length", reason="unverified end",
                           retryable=True, http_status=status, free=True)
        record.received = writer.transferred
        digests = writer.hexdigests()
        expected = record.entry.checksum
        if expected and digests[expected.algorithm] != expected.hexdigest:
            raise _Outcome(
                f"checksum mismatch: expected {expected.algorithm} {expected.hexdigest}, "
                f"got {digests[expected.algorithm]}",
                reason="checksum mismatch", retryable=False, http_status=status, keep_part=False,
            )
        try:
            writer.commit()
        except BodyError as exc:
            raise _Outcome(str(exc), reason=_reason(exc), retryable=False, http_status=status,
                           keep_part=False) from exc
        record.status, record.size, record.checksum = "downloaded", writer.size, digests[self.algorithm]

    def _finished(self, record: FileRecord) -> None:
        if record.status == "failed":
            logger.error("Failed %s: %s", record.url, record.error)
        self.inc_stats(record.status)
        self.crawler.signals.send_catch_log(signals.file_finished, record=record)


_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (StallTimeoutError, "stall timeout"),
    (DownloadTimeoutError, "timeout"),
    (DownloadConnectionRefusedError, "connection refused"),
    (CannotResolveHostError, "DNS lookup failed"),
    (ResponseDataLossError, "connection lost mid-body"),
    (DownloadFailedError, "connection failed"),
    (TLSError, "TLS error"),
    (FileTooLarge, "over FETCHER_MAX_SIZE"),
    (StorageError, "disk error"),
    (LengthMismatch, "length mismatch"),
    (ResumeMismatch, "bad resume"),
    (RedirectLoopError, "redirect loop"),
    (IgnoreRequest, "not downloaded"),
)


def _reason(exc: BaseException) -> str:
    """The short failure category the summary groups by."""
    for cls, reason in _REASONS:
        if isinstance(exc, cls):
            return reason
    return type(exc).__name__
