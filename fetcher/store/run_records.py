"""One run's side of the store's records (fetcher.store.records): opened at start, each
URL's end recorded as it comes, and at the end the manifest compacted, failed.txt
written with the rerun hint, and a remote store's manifest uploaded.

The records hang on signals (fetcher's ``file_finished``, Scrapy's ``spider_closed``),
not on the pipeline's methods, so a FilesPipeline subclass that overrides
``open_spider`` or ``close_spider`` cannot lose them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scrapy import signals as scrapy_signals
from scrapy.settings import SETTINGS_PRIORITIES

from fetcher import signals
from fetcher.cli import INVOKED_AS
from fetcher.exceptions import StartupError
from fetcher.items import BAD_LINE
from fetcher.store.naming import owner_name
from fetcher.store.records import (
    PathLocks,
    RecordStore,
    StoredRecord,
    new_run_id,
    utc_now,
)
from fetcher.store.targets import RemoteTarget, Target

if TYPE_CHECKING:
    from scrapy.crawler import Crawler

    from fetcher.config import Config
    from fetcher.items import FileRecord

logger = logging.getLogger(__name__)


class RunRecords:
    """The records of the store a run writes to, and the locks of its paths."""

    def __init__(self, crawler: Crawler, config: Config, target: Target) -> None:
        self.crawler = crawler
        self.config = config
        self.target = target
        self.state_dir = Path(config.state_dir) if config.state_dir else target.state_default
        reports = self.state_dir if isinstance(target, RemoteTarget) else target.basedir
        self.manifest_path = Path(config.manifest or reports / "manifest.jsonl")
        self.failed_path = Path(config.failed_list or reports / "failed.txt")
        # A worker process writes its run's records: they carry the run's id.
        self.run_id = config.worker_channel.run_id if config.worker_channel else new_run_id()
        try:  # blocking (an old store's manifest is imported once): at start, before the first download
            store_dir = None if isinstance(target, RemoteTarget) else target.basedir
            self.records: RecordStore | None = RecordStore.open(
                self.state_dir, self.manifest_path, self.failed_path, store_dir)
            self.locks = PathLocks(self.state_dir)
        except (OSError, sqlite3.Error, RuntimeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise StartupError(f"cannot open the store's records in {self.state_dir}: {why}") from None
        self._own = self._own_names()
        self._said_unwritten = False
        #: Awaited before the records are closed: the run's worker processes, still writing them.
        self.writers: list[Callable[[], Awaitable[None]]] = []
        crawler.signals.connect(self.put, signal=signals.file_finished)
        crawler.signals.connect(self.close, signal=scrapy_signals.spider_closed)

    def put(self, record: FileRecord) -> None:
        """Every URL's end (the pipeline's files and the spider's bad lines) becomes its current record;
        one that has its manifest line was recorded already (by a worker process of this run)."""
        if self.records is not None and record.line is None:
            stored = self.stored(record)
            record.line = stored.manifest()  # the fetch spider's item takes it too: redacted and built once
            self.records.put(stored, durable=record.status != "uptodate", line=record.line)
            self._check_written(self.records)

    def _check_written(self, records: RecordStore) -> None:
        """Say once (records_unwritten) that the records are incomplete: the run cannot end well."""
        if not records.ok and not self._said_unwritten:
            self._said_unwritten = True
            self.crawler.signals.send_catch_log(signals.records_unwritten)

    def reserved(self, path: str) -> str | None:
        """Why *path* (in the store) can never be a download's name: it is, holds, or lies in
        one of the store's own files (the manifest, failed.txt, the state folder, their
        temporary names); None when it may be one."""
        name = owner_name(path)
        for own in self._own:
            if name == own or name.startswith(own + "/") or own.startswith(name + "/") or (
                    name.startswith(own + ".") and name.endswith(".tmp")):
                return f"{path} is the store's own {own} (its records): choose another name"
        return None

    def _own_names(self) -> tuple[str, ...]:
        """The store's own files and folders, as names inside the store."""
        if isinstance(self.target, RemoteTarget):
            return ("manifest.jsonl",)  # the uploaded report
        root = os.path.realpath(self.target.basedir)
        names = []
        for own in (self.manifest_path, self.failed_path, self.state_dir):
            rel = os.path.relpath(os.path.realpath(own), root)
            if rel != "." and not rel.startswith(".."):
                names.append(rel.replace(os.sep, "/"))
        return tuple(names)

    def stored(self, record: FileRecord) -> StoredRecord:
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

    def manifest_line(self, url: str) -> dict[str, Any] | None:
        """The store's current record of *url*, as its manifest line (confirmations flushed first)."""
        if self.records is None:
            return None
        self.records.flush()
        record = self.records.lookup(url)
        return record.manifest() if record is not None else None

    def flush(self) -> None:
        """Confirmations do not wait for the next record (see RecordStore.put)."""
        if self.records is not None:
            self.records.flush()

    async def close(self) -> None:
        """Leave the records true for the next run (a worker process leaves that to its run),
        once the run's worker processes have written theirs."""
        for writer in self.writers:
            await writer()
        records, self.records = self.records, None
        if records is None:
            return
        try:
            if self.config.worker_channel is None:
                await self._close_out(records)
        finally:
            records.close()
            self.locks.close()

    async def _close_out(self, records: RecordStore) -> None:
        """The manifest with one line per URL, failed.txt with the store's failures, a remote
        store's manifest uploaded."""
        await asyncio.to_thread(records.compact)
        rerun = self.rerun_hint()
        count = await asyncio.to_thread(
            records.write_failed_list,
            f"# fetcher: the URLs of {self.target.describe()} whose last attempt failed.\n# {rerun}\n")
        if count:
            logger.info("%d URLs of this store are failed (%s); %s", count, self.failed_path, rerun)
        self._check_written(records)
        if isinstance(self.target, RemoteTarget) and self.manifest_path.exists():
            try:
                await asyncio.to_thread(self.target.upload_report, self.manifest_path, "manifest.jsonl")
            except Exception as exc:  # noqa: BLE001 - the local manifest is still complete
                logger.error("Cannot upload the manifest to %s: %s", self.target.describe(), exc)

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
        if self.config.invoked_as == INVOKED_AS:
            return f"Retry them with: {INVOKED_AS} {failed}{store}"
        return f"Retry them with: scrapy crawl fetch -a list={failed}{store}"
