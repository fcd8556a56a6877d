"""The store's records: one current record per URL ever fetched into a store,
kept across runs and safe with several processes writing at once.

No Scrapy here. The truth is an SQLite index in WAL mode (``index.sqlite`` in
the store's state folder); ``manifest.jsonl`` is its JSON Lines view and
``failed.txt`` its list of failures:

- a record is committed to the index, then appended to the manifest with one
  ``write`` on an ``O_APPEND`` file, both under a shared ``flock`` of
  ``manifest.lock``; so a ``kill -9`` leaves the manifest complete up to the
  last finished file, and concurrent writers never interleave a line;
- a record that replaces an earlier one of its URL leaves a superseded line
  behind; ``compact`` rewrites the manifest from the index (under the lock,
  held exclusively, so no appended line is lost or doubled) when any was left;
- ``PathLocks`` gives each final path one writer at a time across processes,
  with byte-range locks that the OS releases when a process dies.

A store written before the index existed (a ``manifest.jsonl`` only) is
imported once: each file it lists is hashed a single time and kept only if it
still matches its record.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import operator
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fetcher.redact import redact, safe_url
from fetcher.store.diskio import hash_file
from fetcher.store.files import (
    PRIVATE,
    no_link,
    open_fd,
    open_file,
    private_file,
    private_folder,
)
from fetcher.store.naming import resolve_in_store

logger = logging.getLogger(__name__)

INDEX_NAME = "index.sqlite"
_SCHEMA_VERSION = "1"
_BUSY_TIMEOUT_MS = 60_000  # another process committing, or compacting a big manifest
_CACHE_KIB = 32 * 1024  # the index of a big store stays in memory: reruns re-read no page
_BATCH_SIZE = 500  # confirmations (uptodate records) written in one transaction...
_BATCH_SECONDS = 1.0  # ...or after this long
_LOCK_SPACE = 1 << 62  # byte offsets a path lock can take in files.lock
#: Fields whose text may quote a URL or a header (an error, a mirror): redacted in output.
_FREE_TEXT = ("error", "note", "mirror")
#: Manifest fields, in the order they are written.
MANIFEST_FIELDS = ("url", "status", "path", "size", "checksum", "algorithm", "http_status", "attempts",
                   "error", "note", "mirror", "run", "finished_at")


def new_run_id() -> str:
    """A short id that tells the runs of a store apart (in every record it writes)."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class StoredRecord:
    """One URL's current record, as the index keeps it."""

    url: str
    status: str  # downloaded, uptodate, cached or failed
    path: str | None = None
    size: int | None = None
    mtime_ns: int | None = None  # of the file when it was recorded: a rerun compares stat, reads nothing
    checksum: str | None = None
    algorithm: str | None = None
    http_status: int | None = None
    attempts: int = 0
    error: str | None = None
    note: str | None = None  # why a file was fetched again, or how a file found on disk was checked
    mirror: str | None = None  # the mirror that served the file, when not the URL itself
    etag: str | None = None
    last_modified: str | None = None
    run: str | None = None
    finished_at: str | None = None
    entry: str | None = None  # the list entry (URL and options) to retry it with; None for a bad line
    fetched_at: str | None = None  # when its bytes last came from the server (FILES_EXPIRES counts from it)

    def manifest(self) -> dict[str, Any]:
        """The manifest line: every field as recorded, without credentials (the manifest,
        the fetch spider's items and feeds, the queue's records all come from here)."""
        line = {name: getattr(self, name) for name in MANIFEST_FIELDS}
        line["url"] = safe_url(self.url)
        for name in _FREE_TEXT:
            if line[name]:
                line[name] = redact(line[name])
        return line

    @property
    def has_file(self) -> bool:
        return self.status != "failed" and self.path is not None


_COLUMNS = tuple(f.name for f in fields(StoredRecord))
_ROW = operator.attrgetter(*_COLUMNS)
_VALUES = f"({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
#: A URL's first record (no row changed when it has one); then _REPLACE.
_INSERT_NEW = f"INSERT INTO records {_VALUES} ON CONFLICT (url) DO NOTHING"
_REPLACE = f"INSERT OR REPLACE INTO records {_VALUES}"


class RecordStore:
    """The records of one store: open it with :meth:`open`, ``put`` every
    record as its URL ends, ``close`` at the end of the run."""

    def __init__(self, state_dir: Path, manifest: Path, failed_list: Path) -> None:
        self.state_dir = state_dir
        self.manifest_path = manifest
        self.failed_path = failed_list
        private_folder(state_dir)
        manifest.parent.mkdir(parents=True, exist_ok=True)
        index = state_dir / INDEX_NAME
        for companion in ("-wal", "-shm"):  # SQLite opens these by name: no link may stand there
            no_link(index.with_name(index.name + companion))
        private_file(index)  # SQLite gives its -wal and -shm the index's mode
        self._db = sqlite3.connect(index, timeout=_BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash of the process loses nothing committed
        self._db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        self._lock_fd = open_fd(state_dir / "manifest.lock", os.O_RDWR | os.O_CREAT, PRIVATE)
        self._manifest_fd = -1
        self._ok = True  # the last write went through (a full disk is reported once, not per file)
        self.superseded = 0  # manifest lines of this run that replaced an earlier line of their URL
        self._batch: list[StoredRecord] = []
        self._lines: list[bytes] = []  # the batch's manifest lines
        self._batch_started = time.monotonic()

    @classmethod
    def open(cls, state_dir: Path, manifest: Path, failed_list: Path, store_dir: Path | None = None) -> RecordStore:
        """Open (or create) the records; import a store that has a manifest but no index.

        Blocking (the import hashes files, once per store): call it at start, before downloads."""
        store = cls(state_dir, manifest, failed_list)
        try:
            with store._locked(fcntl.LOCK_EX):
                # Under the lock: two processes turning a new index to WAL at once could get
                # "database is locked" at once (SQLite does not wait for that change).
                store._db.execute("PRAGMA journal_mode=WAL")
                store._create_schema(store_dir)
        except BaseException:
            store.close()
            raise
        return store

    # -- reading

    def lookup(self, url: str) -> StoredRecord | None:
        row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM records WHERE url = ?", (url,)).fetchone()
        return None if row is None else StoredRecord(*row)

    @property
    def ok(self) -> bool:
        """Whether the last write of the records went through (see _report)."""
        return self._ok

    def owner_of(self, path: str) -> str | None:
        """The URL whose finished file is at *path*, if any (a scan: for the rare case of
        a name that is both one URL's finished file and another's ``.part``)."""
        row = self._db.execute("SELECT url FROM records WHERE path = ? AND status != 'failed' LIMIT 1",
                               (path,)).fetchone()
        return None if row is None else str(row[0])

    def has_paths_outside(self, folder: str) -> bool:
        """Whether any recorded file lies outside *folder* (another layout's files)."""
        pattern = folder.replace("%", r"\%").replace("_", r"\_") + "/%"
        query = "SELECT 1 FROM records WHERE path IS NOT NULL AND path NOT LIKE ? ESCAPE '\\' LIMIT 1"
        return self._db.execute(query, (pattern,)).fetchone() is not None

    def __iter__(self) -> Iterator[StoredRecord]:
        cursor = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM records ORDER BY finished_at, url")
        for row in cursor:
            yield StoredRecord(*row)

    # -- writing

    def put(self, record: StoredRecord, *, durable: bool = True, line: dict[str, Any] | None = None) -> None:
        """Make *record* its URL's current record, in the index and the manifest.

        A durable record (a file downloaded, a failure) is committed at once. One
        that only confirms what the index holds (``uptodate``) may wait up to
        _BATCH_SECONDS or _BATCH_SIZE records to share a transaction: a rerun of
        a big store then writes (and SQLite's checkpoints read back) a few pages
        per batch instead of a few per file; a kill loses only confirmations.
        *line* is ``record.manifest()`` when the caller made it already."""
        self._batch.append(record)
        self._lines.append((json.dumps(line or record.manifest(), ensure_ascii=False) + "\n").encode())
        if durable or len(self._batch) >= _BATCH_SIZE or time.monotonic() - self._batch_started >= _BATCH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the records waiting in the batch (see put)."""
        batch, self._batch, self._batch_started = self._batch, [], time.monotonic()
        lines, self._lines = b"".join(self._lines), []
        if not batch:
            return
        try:
            with self._locked(fcntl.LOCK_SH):
                self.superseded += self._insert([_ROW(r) for r in batch])
                os.write(self._manifest(), lines)
            self._ok = True
        except (OSError, sqlite3.Error) as exc:
            self._report(exc)

    def _insert(self, rows: list[tuple[Any, ...]]) -> int:
        """Commit *rows*; how many replaced an earlier record of their URL.

        The common record, one new URL, is one statement in autocommit mode (its own
        transaction, as durable as a BEGIN..COMMIT around it); a batch, or a record that
        replaces one, is a transaction that also flags the manifest for compaction."""
        if len(rows) == 1 and self._db.execute(_INSERT_NEW, rows[0]).rowcount:
            return 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            replaced = 0
            for row in rows:
                if not self._db.execute(_INSERT_NEW, row).rowcount:
                    self._db.execute(_REPLACE, row)
                    replaced += 1
            if replaced and not self.superseded:  # once per process: a killed run leaves it set
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('superseded', '1')")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return replaced

    def move_path(self, old: str, new: str) -> None:
        """A finished file moved inside the store (a name that became a folder):
        its records follow it; the manifest is rewritten at the end of the run."""
        try:
            with self._locked(fcntl.LOCK_SH):
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("UPDATE records SET path = ? WHERE path = ?", (new, old))
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('superseded', '1')")
                self._db.execute("COMMIT")
        except (OSError, sqlite3.Error) as exc:
            self._report(exc)

    def compact(self) -> None:
        """Rewrite the manifest with one line per URL, if lines were superseded
        (by this run or a run that was killed), or if it went missing."""
        self.flush()
        try:
            with self._locked(fcntl.LOCK_EX):
                flagged = self._db.execute("SELECT value FROM meta WHERE key = 'superseded'").fetchone()
                if not (flagged or self.superseded) and self.manifest_path.exists():
                    return
                tmp = self.manifest_path.with_name(f"{self.manifest_path.name}.{os.getpid()}.tmp")
                with open_file(tmp, "w", encoding="utf-8") as f:
                    for record in self:
                        f.write(json.dumps(record.manifest(), ensure_ascii=False) + "\n")
                os.replace(tmp, self.manifest_path)
                self._db.execute("DELETE FROM meta WHERE key = 'superseded'")
        except (OSError, sqlite3.Error) as exc:
            self._report(exc)

    def write_failed_list(self, header: str) -> int:
        """Replace failed.txt (atomically, mode 0600: it may hold credentials in URLs
        and headers) with every URL of the store whose current record is failed,
        in the list format; remove it when there is none. Returns how many."""
        rows = self._db.execute(
            "SELECT url, error, entry FROM records WHERE status = 'failed' ORDER BY finished_at, url").fetchall()
        try:
            if not rows:
                self.failed_path.unlink(missing_ok=True)
                return 0
            tmp = self.failed_path.with_name(f"{self.failed_path.name}.{os.getpid()}.tmp")
            with open_file(tmp, "w", PRIVATE, encoding="utf-8") as f:
                f.write(header)
                for url, error, entry in rows:
                    # A bad list line cannot be retried as it is: it stays a comment to fix by hand.
                    comment = " ".join(redact(error or "failed").splitlines())  # one line: never read as an entry
                    f.write(f"# {comment}\n" + (f"{entry}\n" if entry else ""))
            os.replace(tmp, self.failed_path)
        except OSError as exc:
            self._report(exc)
        return len(rows)

    def close(self) -> None:
        self.flush()
        if self._manifest_fd >= 0:
            os.close(self._manifest_fd)
            self._manifest_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        self._db.close()

    # -- inside

    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        fcntl.flock(self._lock_fd, how)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _manifest(self) -> int:
        """The manifest's descriptor, reopened when a compaction replaced the file (or it was
        removed): the open file then has no name left, which an fstat tells without a path lookup."""
        if self._manifest_fd >= 0 and os.fstat(self._manifest_fd).st_nlink:
            return self._manifest_fd
        if self._manifest_fd >= 0:
            os.close(self._manifest_fd)
            self._manifest_fd = -1
        self._manifest_fd = open_fd(self.manifest_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return self._manifest_fd

    def _report(self, exc: Exception) -> None:
        """A full disk must not stop the run: say it once, not per file."""
        if self._ok:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            logger.error("Cannot write the records in %s: %s; records are missing until that is fixed",
                         self.state_dir, reason)
        self._ok = False

    def _create_schema(self, store_dir: Path | None) -> None:
        columns = ", ".join(f"{c} {'TEXT PRIMARY KEY' if c == 'url' else ''}" for c in _COLUMNS)
        self._db.execute(f"CREATE TABLE IF NOT EXISTS records ({columns})")
        present = {row[1] for row in self._db.execute("PRAGMA table_info(records)")}
        for column in _COLUMNS:  # fields added since the index was made are added empty
            if column not in present:
                self._db.execute(f"ALTER TABLE records ADD COLUMN {column}")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        version = self._db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        if version is not None:
            if version[0] != _SCHEMA_VERSION:
                raise RuntimeError(f"{self.state_dir / INDEX_NAME} was written by another version of fetcher "
                                   f"(records version {version[0]}, this one reads {_SCHEMA_VERSION})")
            return
        imported = self._import_manifest(store_dir) if store_dir is not None else 0
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (_SCHEMA_VERSION,))
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('superseded', '1')")  # rewrite in the new format
        if imported:
            logger.info("Imported %d records from %s into %s", imported, self.manifest_path, self.state_dir)

    def _import_manifest(self, store_dir: Path) -> int:
        """Records of a store written before the index: a file is kept only if it
        still has the size and digest its record gives (each is hashed once)."""
        try:
            with open_file(self.manifest_path, "r", encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return 0
        finished_at = utc_now()
        count = 0
        self._db.execute("BEGIN IMMEDIATE")
        for text in lines:
            record = _imported(text, store_dir, finished_at)
            if record is None:
                continue
            self._db.execute(_REPLACE, tuple(asdict(record).values()))
            count += 1
        self._db.execute("COMMIT")
        return count


def _imported(text: str, store_dir: Path, finished_at: str) -> StoredRecord | None:
    """The record an old manifest's line gives, or None when it is not imported."""
    try:
        old = json.loads(text)
        record = StoredRecord(old["url"], old["status"], run="imported", finished_at=finished_at,
                              error=old.get("error"), http_status=old.get("http_status"),
                              attempts=old.get("attempts") or 0)
    except (ValueError, KeyError, TypeError):
        return None
    if record.status == "failed":
        record.entry = record.url if "://" in record.url else None
        return record
    final = _in_store(old.get("path"), store_dir, record.url)
    if final is None:
        return None
    if not _import_file(record, old, final):
        # A file that no longer matches (or is gone) keeps a record no stat matches: fetched again.
        record.path, record.size, record.checksum = old["path"], old.get("size"), old.get("checksum")
        record.algorithm, record.note = old.get("algorithm"), "did not match its record when imported"
    return record


def _in_store(path: Any, store_dir: Path, url: str) -> Path | None:
    """Where an old manifest's *path* is in the store; None when it names none (no path, or
    one outside the store: then its record is not imported)."""
    if not path:
        return None
    try:
        return resolve_in_store(store_dir, str(path))
    except ValueError as exc:
        logger.warning("Not importing %s's record: its path %r is not a file in the store (%s)",
                       safe_url(url), path, exc)
        return None


def _import_file(record: StoredRecord, old: dict[str, Any], final: Path) -> bool:
    """Take the file at *final* as the record's, if it still has its recorded size and digest."""
    path, algorithm, checksum = old["path"], old.get("algorithm"), old.get("checksum")
    if not (algorithm and checksum) or algorithm not in hashlib.algorithms_available:
        return False
    try:
        st = final.stat()
        size, digests = hash_file(final, (algorithm,))
    except OSError:
        return False
    if digests[algorithm] != checksum or (old.get("size") is not None and old["size"] != size):
        logger.warning("%s no longer matches its record; it is not trusted", final)
        return False
    record.path, record.size, record.mtime_ns = path, size, st.st_mtime_ns
    record.checksum, record.algorithm = checksum, algorithm
    record.note = "imported from a manifest written before the index"
    return True


class PathLocks:
    """One writer per final path across processes: a byte-range lock in
    ``files.lock`` at an offset derived from the path. The OS releases a
    process's locks when it dies, even by ``kill -9``. Within one process the
    caller keeps its own map (POSIX locks do not exclude their own process)."""

    def __init__(self, state_dir: Path) -> None:
        private_folder(state_dir)
        self._fd = open_fd(state_dir / "files.lock", os.O_RDWR | os.O_CREAT, PRIVATE)

    @staticmethod
    def _offset(path: str) -> int:
        return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "big") % _LOCK_SPACE

    def try_acquire(self, path: str) -> bool:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._offset(path))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def release(self, path: str) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._offset(path))

    def close(self) -> None:
        os.close(self._fd)
