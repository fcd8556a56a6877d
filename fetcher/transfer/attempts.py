"""One file's download: its attempts, mirror rotation, split downloads, the
checks on a finished body, the rename into place, and the upload to a remote store.

:class:`Transfers` is what every file of a run shares (the engine, the config,
the store, the retry helper, the transfers in flight); :meth:`Transfers.fetch`
runs one file's :class:`_FileTransfer` and returns its record. The caller (the
pipeline) owns the file's name, its claim and its lock, and hands in a
:data:`Namer` for a name that depends on the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fetcher.contract import (
    CACHED_FLAG,
    DATALOSS_FLAG,
    SINK_META,
    STREAMED_FLAG,
    UNVERIFIED_END_FLAG,
)
from fetcher.items import FileRecord
from fetcher.redact import safe_url
from fetcher.store.naming import INDEX_NAME, PART_SUFFIX
from fetcher.store.targets import LocalTarget, RemoteTarget, Target
from fetcher.store.writer import BodyError, HashingWriter, Validators
from fetcher.transfer.backoff import retry_after_seconds
from fetcher.transfer.retry import Action, Attempt, AttemptFailed, reason_of
from fetcher.transfer.split import SplitDownload

if TYPE_CHECKING:
    from pathlib import Path

    from scrapy.crawler import Crawler
    from scrapy.http import Request, Response

    from fetcher.config import Config
    from fetcher.contract import HeadersLike, Sink
    from fetcher.listing.urllist import Entry
    from fetcher.store.freshness import Freshness
    from fetcher.transfer.retry import Retrier

logger = logging.getLogger(__name__)

_END_CHECKS = 3  # Range requests that may confirm the end of a body that had no length
#: The name a finished file is saved under, given the response that brought it (a subclass's
#: ``file_path`` may depend on it); claimed by the caller, or AttemptFailed("path conflict").
Namer = Callable[["Response"], Awaitable[str]]


class Transfers:
    """The downloads of a run's files, and what they share."""

    def __init__(self, crawler: Crawler, config: Config, target: Target, retrier: Retrier, freshness: Freshness,
                 *, allow_redirects: bool) -> None:
        self.crawler = crawler
        self.config = config
        self.allow_redirects = allow_redirects  # MEDIA_ALLOW_REDIRECTS
        self.target = target
        self.retrier = retrier
        self.freshness = freshness
        self._inflight: set[asyncio.Future[Response]] = set()
        self._stopping = False
        self._turn = -1  # which mirror the next entry with mirrors starts at
        self._said_in_memory = False

    async def fetch(self, request: Request, entry: Entry, path: str, final: Path, name: Namer) -> FileRecord:
        """Download *entry*'s file to *final* (the store's *path*), unless it is up to date."""
        return await _FileTransfer(self, request, entry, path, final, name).run()

    def stop(self) -> int:
        """The run is ending: cut every transfer in flight (their .part files are kept); how many."""
        self._stopping = True
        for transfer in list(self._inflight):
            transfer.cancel()
        return len(self._inflight)

    async def download(self, request: Request, url: str, sink: Sink, extra: dict[str, str]) -> Response:
        """One attempt of *request* from *url* into *sink*, with *extra* headers (Range, conditions)."""
        if self.retrier.stopping():  # Ctrl-C, CLOSESPIDER_*: start nothing new; a rerun resumes
            raise AttemptFailed.stopped("the run was stopped before this file was fetched")
        headers = dict(request.headers.to_unicode_dict())
        headers["Accept-Encoding"] = "identity"  # the bytes the server has, not a re-encoding
        headers.update(extra)
        attempt = request.replace(url=url, headers=headers, meta={
            **request.meta, SINK_META: sink, "dont_retry": True,
            **({} if self.allow_redirects else {"dont_redirect": True})})
        # The handler holds a transfer slot (CONCURRENT_REQUESTS) only while bytes can flow:
        # neither a request queued behind its host's limit nor a backoff holds one.
        assert self.crawler.engine is not None
        transfer = asyncio.ensure_future(self.crawler.engine.download_async(attempt))
        self._inflight.add(transfer)
        try:
            return await transfer
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            raise AttemptFailed.stopped("the run was stopped during the transfer (its .part is kept: a rerun "
                                        "resumes it)") from None
        except Exception as exc:  # the handler's, the writer's or a middleware's error: the policy says
            raise AttemptFailed.of(self.retrier.policy.classify(Attempt(error=exc))) from exc
        finally:
            self._inflight.discard(transfer)

    async def head(self, request: Request) -> Response:
        """The server's answer to a HEAD of *request*, through fetcher's handler (it carries a
        sink that takes no body): credentials, proxies and limits as for the body itself."""
        head = request.replace(method="HEAD", headers={**request.headers.to_unicode_dict(),
                                                       "Accept-Encoding": "identity"},
                               meta={**request.meta, SINK_META: _NO_BODY, "dont_retry": True})
        assert self.crawler.engine is not None
        return await self.crawler.engine.download_async(head)

    def said_in_memory(self, response: Response) -> None:
        """Say once per run that bodies arrive in memory (a project whose DOWNLOAD_HANDLERS
        do not stream): they are written as stock writes them, but held whole and capped."""
        if self._said_in_memory or CACHED_FLAG in response.flags:
            return
        self._said_in_memory = True
        logger.warning("%s came in memory, not streamed: DOWNLOAD_HANDLERS should map http and https to "
                       "fetcher.handlers.StreamingDownloadHandler (the add-on does), or bodies are held whole "
                       "and capped at DOWNLOAD_MAXSIZE", safe_url(response.url))

    def mirror_order(self, entry: Entry, request: Request) -> tuple[str, ...]:
        """The URLs to try, in order: the entry's mirrors, each entry starting at
        the next one, so that concurrent files spread over the mirrors."""
        if request.url != entry.url or not entry.mirrors:
            return (request.url,)
        urls = entry.urls
        self._turn += 1
        start = self._turn % len(urls)
        return urls[start:] + urls[:start]


class _NoBody:
    """The sink of a HEAD: it takes no body (fetcher's handler then answers with the headers)."""

    expected_size = None

    def begin(self, status: int, headers: HeadersLike) -> bool:
        return False

    def write(self, data: bytes) -> None:
        raise AssertionError("a HEAD has no body")

    def finish(self, *, accept_short: bool = False) -> None:
        pass


_NO_BODY = _NoBody()


class _FileTransfer:
    """One file's attempts, from the up-to-date check to its record."""

    def __init__(self, shared: Transfers, request: Request, entry: Entry, path: str, final: Path,
                 name: Namer) -> None:
        self.shared = shared
        self.config = shared.config
        self.request = request
        self.entry = entry
        self.name = name
        self.algorithms: tuple[str, ...] = (self.config.algorithm,)
        if entry.checksum and entry.checksum.algorithm != self.config.algorithm:
            self.algorithms += (entry.checksum.algorithm,)
        self.record = FileRecord(entry, "failed", path=path, algorithm=self.config.algorithm)
        self.writer = HashingWriter(final, entry.url, self.algorithms, resume=self.config.resume,
                                    max_size=self.config.max_size, fsync=self.config.fsync,
                                    allocation=self.config.file_allocation)

    async def run(self) -> FileRecord:
        started = time.monotonic()
        record = self.record
        try:
            conditional: dict[str, str] = {}
            if await self.shared.freshness.check(record, self.writer.final, self.algorithms,
                                              lambda: self.shared.head(self.request)):
                if not (self.config.revalidate and (record.etag or record.last_modified)):
                    return record
                conditional = Validators(self.entry.url, record.etag, record.last_modified).conditional()
            self._check_part()
            if not await self._split(conditional):
                await self._attempts(conditional)
        except AttemptFailed as failed:
            self._fail(failed)
        finally:
            self.writer.close()
            record.elapsed = time.monotonic() - started
        return record

    def _check_part(self) -> None:
        """A ``.part`` is only ever this file's partial body: when its name is another URL's
        finished file (``/x.part`` beside ``/x``), it is left alone and this file fails."""
        if not self.writer.part.exists():
            return
        name = f"{self.record.path}{PART_SUFFIX}"
        owner = self.shared.freshness.records.owner_of(name)
        if owner is not None and owner != self.entry.url:
            raise AttemptFailed(f"{name} is the file of another URL ({safe_url(owner)}); this file cannot be "
                                "written beside it", reason="path conflict", retryable=False)

    async def _split(self, conditional: dict[str, str]) -> bool:
        """aria2's ``split=``: True when the file came as ranges (see fetcher.transfer.segments)."""
        split = self.entry.split or self.config.split
        if split < 2 or conditional or self.request.url != self.entry.url:
            return False
        job = SplitDownload(self.request, self.writer, self.record, split=split, min_size=self.config.min_split_size,
                            download=self.shared.download, head=self.shared.head, retrier=self.shared.retrier)
        response = await job.run()
        if response is None:  # it cannot be split: it is fetched as one stream
            return False
        await self._commit(response)
        return True

    async def _attempts(self, conditional: dict[str, str]) -> None:
        """Try the file until it is in the store or fails for good: failed attempts are
        retried with backoff; with mirrors, the next one is tried at once."""
        record, writer = self.record, self.writer
        mirrors = _Mirrors(self.shared.mirror_order(self.entry, self.request), self.entry)
        times = self.shared.retrier.policy.times_for(self.request.meta) + len(mirrors.urls) - 1
        free_checks = _END_CHECKS
        while True:
            record.attempts += 1
            try:
                await _prepare(writer, self.config.resume)
                response = await self.shared.download(self.request, mirrors.current, writer,
                                                   {**conditional, **writer.range_headers()})
                if response.status == 304 and conditional:
                    record.http_status = 304
                    return  # the up-to-date check filled the record in
                await self._complete(response)
                record.mirror = mirrors.current if mirrors.current != self.entry.url else None
                return
            except AttemptFailed as failed:
                writer.close()
                record.received = writer.transferred
                if not failed.keep_part:
                    writer.discard()
                if failed.free and free_checks:  # part of this attempt: ask again at once
                    free_checks, record.attempts = free_checks - 1, record.attempts - 1
                    continue
                record.http_status = failed.http_status
                if mirrors.fail_over(failed, writer):
                    continue
                if not await self.shared.retrier.again(mirrors.waitable(failed), record.attempts - 1, times,
                                                    safe_url(self.entry.url)):
                    raise mirrors.final(self._stopped_after(failed)) from None

    def _stopped_after(self, failed: AttemptFailed) -> AttemptFailed:
        """What to record when the run stopped while a retry was due: what happened, and that."""
        if failed.reason == "stopped" or not failed.retryable or not self.shared.retrier.stopping():
            return failed
        return AttemptFailed(f"{failed}; the run stopped before another attempt", reason="stopped",
                             retryable=False, http_status=failed.http_status)

    def _fail(self, failed: AttemptFailed) -> None:
        self.record.status, self.record.error, self.record.reason = "failed", str(failed), failed.reason
        if failed.http_status is not None:
            self.record.http_status = failed.http_status

    async def _complete(self, response: Response) -> None:
        """Judge a response: commit the file, or raise the AttemptFailed to act on."""
        writer, status, flags = self.writer, response.status, frozenset(response.flags)
        self.record.http_status = status
        retry_after = None
        if status in (429, 503):
            retry_after = retry_after_seconds((response.headers.get("Retry-After") or b"").decode("latin-1"),
                                              time.time())
        part_complete = writer.is_complete_part(status, response.headers)
        verdict = self.shared.retrier.policy.classify(Attempt(
            status=status, streamed=STREAMED_FLAG in flags, flags=flags, resumed=bool(writer.offset),
            part_complete=part_complete, retry_after=retry_after,
            # No length and the connection closed: a reset looks the same as the end.
            unverified_end=UNVERIFIED_END_FLAG in flags and writer.resumable(),
        ))
        if verdict.action is not Action.DONE:
            raise AttemptFailed.of(verdict, status)
        in_memory = STREAMED_FLAG not in flags and not part_complete
        if in_memory:  # Scrapy's HTTP cache, or a handler or middleware that is not fetcher's
            self.shared.said_in_memory(response)
            _write_body(writer, response)
        elif part_complete:
            writer.size = writer.offset  # nothing was missing: the kept part is the whole file
        self.record.received = 0 if CACHED_FLAG in flags else writer.transferred
        await self._commit(response)

    async def _commit(self, response: Response) -> None:
        """A complete body: check it (empty, checksum), name it, move it into place, upload it."""
        writer, record, status = self.writer, self.record, response.status
        if writer.size == 0 and not self.config.empty_files:
            raise AttemptFailed("empty body (stock FilesPipeline refuses empty files; FETCHER_EMPTY_FILES=True keeps "
                                "them)", reason="empty-content", retryable=False, http_status=status, keep_part=False)
        digests = writer.hexdigests()
        expected = self.entry.checksum
        if expected and digests[expected.algorithm] != expected.hexdigest:
            raise AttemptFailed(f"checksum mismatch: expected {expected.algorithm} {expected.hexdigest}, got "
                                f"{digests[expected.algorithm]}", reason="checksum mismatch", retryable=False,
                                http_status=status, keep_part=False)
        first = writer.final
        self._rename(await self.name(response))
        if writer.final.is_dir():  # its name became a folder while it was downloaded (see the pipeline)
            writer.final, record.path = writer.final / INDEX_NAME, f"{record.path}/{INDEX_NAME}"
        try:
            st = writer.commit()
        except BodyError as exc:
            raise AttemptFailed(str(exc), reason=reason_of(exc), retryable=False, http_status=status,
                                keep_part=False) from exc
        record.status = "cached" if CACHED_FLAG in response.flags else "downloaded"
        record.size, record.checksum = writer.size, digests[self.config.algorithm]
        record.mtime_ns, record.response = st.st_mtime_ns, response
        if writer.final != first and isinstance(self.shared.target, LocalTarget):
            self.shared.target.prune(first.parent)
        if DATALOSS_FLAG in response.flags:
            record.note = (f"kept short: the connection ended after {writer.size} bytes of "
                           f"{writer.expected_size} (DOWNLOAD_FAIL_ON_DATALOSS=False)")
        if writer.validators is not None:
            record.etag, record.last_modified = writer.validators.etag, writer.validators.last_modified
        if isinstance(self.shared.target, RemoteTarget):
            await self._upload()

    def _rename(self, path: str) -> None:
        """Name the file as a subclass's file_path does once it sees the response."""
        if path == self.record.path:
            return
        try:
            self.writer.final = self.shared.target.local_path(path)
            self.writer.final.parent.mkdir(parents=True, exist_ok=True)
        except ValueError as exc:
            raise AttemptFailed(f"unsafe path {path!r}: {exc}", reason="unsafe path", retryable=False,
                                keep_part=False) from exc
        except OSError as exc:
            raise AttemptFailed(f"cannot make the folders for {path}: {exc.strerror or exc}", reason="disk error",
                                retryable=False, keep_part=False) from exc
        self.record.path = path

    async def _upload(self) -> None:
        """Upload the verified file from the spool, retried as every transfer is; it is never
        recorded as downloaded unless the store took it. The spool copy goes either way."""
        target, record, local = self.shared.target, self.record, self.writer.final
        assert isinstance(target, RemoteTarget) and record.path and record.checksum and record.size is not None
        retrier, retries = self.shared.retrier, 0
        try:
            while True:
                try:
                    await asyncio.to_thread(target.upload, local, record.path, record.size,
                                            self.config.algorithm, record.checksum)
                    return
                except Exception as exc:  # noqa: BLE001 - every store's client raises many kinds
                    failed = AttemptFailed(f"upload to {target.describe()} failed: {exc}", reason="upload failed",
                                           retryable=True)
                    if not await retrier.again(failed, retries, retrier.times, f"the upload of {record.path}"):
                        raise AttemptFailed(str(failed), reason=failed.reason, retryable=False) from exc
                    retries += 1
        finally:
            with contextlib.suppress(OSError):
                local.unlink()


class _Mirrors:
    """An entry's URLs and how each has fared: fail over to the next one at once, the
    same one again only after a backoff; bytes of two mirrors are spliced only when a
    checksum checks them."""

    def __init__(self, urls: tuple[str, ...], entry: Entry) -> None:
        self.urls = urls
        self.entry = entry
        self.at = 0
        self.tried = {urls[0]}
        self.dead: set[str] = set()
        self.failures: dict[str, str] = {}

    @property
    def current(self) -> str:
        return self.urls[self.at]

    def fail_over(self, failed: AttemptFailed, writer: HashingWriter) -> bool:
        """After *failed*, move to the next live mirror; True when it was never tried (try it at once)."""
        if len(self.urls) < 2 or failed.reason == "stopped":
            return False
        self.failures[self.current] = str(failed)
        if not failed.retryable:
            self.dead.add(self.current)
        following = [(self.at + i) % len(self.urls) for i in range(1, len(self.urls) + 1)]
        alive = [i for i in following if self.urls[i] not in self.dead]
        if not alive:
            return False
        if alive[0] != self.at and not self.entry.checksum:
            writer.discard()
        self.at = alive[0]
        if self.current in self.tried:
            return False
        self.tried.add(self.current)
        logger.debug("Trying %s's mirror %s: %s", safe_url(self.entry.url), safe_url(self.current), failed)
        return True

    def waitable(self, failed: AttemptFailed) -> AttemptFailed:
        """With a live mirror left, any failure is worth another attempt after a backoff."""
        if len(self.urls) < 2 or failed.retryable or failed.reason == "stopped" \
                or all(u in self.dead for u in self.urls):
            return failed
        again = AttemptFailed(str(failed), reason=failed.reason, retryable=True, http_status=failed.http_status,
                              retry_after=failed.retry_after)
        again.__cause__ = failed.__cause__
        return again

    def final(self, failed: AttemptFailed) -> AttemptFailed:
        """The file's failure: with mirrors, what each of them said."""
        if len(self.urls) < 2 or failed.reason == "stopped":
            return failed
        return AttemptFailed("every mirror failed: " + "; ".join(
            f"{safe_url(u)}: {why}" for u, why in self.failures.items()), reason=failed.reason, retryable=False,
            http_status=failed.http_status)


async def _prepare(writer: HashingWriter, resume: bool) -> None:
    """Find what a kept ``.part`` holds before an attempt (hashing it is disk work: off the loop)."""
    try:
        if resume and writer.part.exists():
            await asyncio.to_thread(writer.prepare)
        else:  # nothing to read: not worth a thread hop per file
            writer.prepare()
    except OSError as exc:  # an unreadable .part: nothing a retry can fix
        raise AttemptFailed(f"cannot read {writer.part}: {exc.strerror or exc}", reason="disk error",
                            retryable=False, keep_part=False) from exc


def _write_body(writer: HashingWriter, response: Response) -> None:
    """A body that is in memory (Scrapy's HTTP cache) goes through the writer like a streamed one."""
    headers = response.headers.copy()
    headers.pop(b"Content-Length", None)  # the cache's body may be decoded: its length is the body's
    try:
        writer.begin(200, headers)
        writer.write(response.body)
        writer.finish()
    except BodyError as exc:
        raise AttemptFailed(str(exc), reason=reason_of(exc), retryable=False, keep_part=False) from exc

