"""Is this URL's file complete and current in the store? The one place that decides.

A file this store recorded is up to date while its size and mtime are the
recorded ones (a stat; FETCHER_VERIFY=full re-hashes it too), it matches the
list's checksum, and it is not older than FILES_EXPIRES. A file with no record
of this URL (another tool's, or a lost record) is trusted only when it matches
the list's checksum or, without one, the server's size and Last-Modified (a
HEAD). A remote object is up to date when a HEAD of it shows the size and
digest fetcher stored with it (or, on FTP, the size its record holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

from fetcher.store.diskio import hash_file
from fetcher.store.targets import RemoteObject, RemoteTarget, Target
from fetcher.transfer.retry import AttemptFailed

if TYPE_CHECKING:
    from pathlib import Path

    from scrapy.http import Response

    from fetcher.items import FileRecord
    from fetcher.store.records import RecordStore, StoredRecord

logger = logging.getLogger(__name__)

#: Asks the server for the headers of this file (a HEAD); raises when it cannot be asked.
Head = Callable[[], Awaitable["Response"]]


class Freshness:
    """Decides, per URL, whether its file in the store can be kept (``uptodate``)."""

    def __init__(self, target: Target, records: RecordStore, *, verify: str, expires: float, algorithm: str) -> None:
        self.target = target
        self.records = records
        self.verify = verify  # "stat" or "full"
        self.expires = expires  # FILES_EXPIRES, days
        self.algorithm = algorithm

    async def check(self, record: FileRecord, final: Path, algorithms: tuple[str, ...], head: Head) -> bool:
        """Whether *record*'s file is complete in the store already. Fills *record*
        when it is; sets ``record.note`` when a file is replaced."""
        prior = self.records.lookup(record.url)
        if prior is not None and not (prior.has_file and prior.path == record.path):
            prior = None
        if isinstance(self.target, RemoteTarget):
            return await self._remote(prior, record)
        try:
            st = os.stat(final)
        except OSError:
            if prior is not None:
                record.note = f"{record.path} was recorded by run {prior.run} but is missing; fetched again"
            return False
        if prior is not None:
            digests = await self._recorded(record, prior, st, final, algorithms)
            if digests is None or self._fetched_long_ago(record, prior):
                return False
        elif self.expired(st.st_mtime):  # another tool's file: its age is its mtime, as stock counts it
            record.note = f"{record.path} on disk is older than FILES_EXPIRES ({self.expires} days); fetched again"
            return False
        else:
            digests = await self._unrecorded(record, st, final, algorithms, head)
            if digests is None:
                return False
        expected = record.entry.checksum
        if expected and digests[expected.algorithm] != expected.hexdigest:
            logger.warning("%s is on disk but does not match %s; downloading it again", final, expected)
            record.note = f"{record.path} did not match the list's {expected.algorithm}; fetched again"
            return False
        record.status, record.size, record.checksum = "uptodate", st.st_size, digests[self.algorithm]
        record.mtime_ns = st.st_mtime_ns
        return True

    async def _recorded(self, record: FileRecord, prior: StoredRecord, st: os.stat_result, final: Path,
                        algorithms: tuple[str, ...]) -> dict[str, str] | None:
        """The digests of a file this store recorded, if it is still what was recorded."""
        if (st.st_size, st.st_mtime_ns) != (prior.size, prior.mtime_ns):
            _replace(record, f"{record.path} changed on disk since run {prior.run} recorded it "
                             f"({_differences(st, prior)}); fetched again")
            return None
        assert prior.algorithm is not None and prior.checksum is not None
        digests = {prior.algorithm: prior.checksum}
        if self.verify == "full" or any(a not in digests for a in algorithms):
            found = await _hash(final, tuple({*algorithms, prior.algorithm}))
            if found[prior.algorithm] != prior.checksum:
                _replace(record, f"{record.path} does not match the {prior.algorithm} recorded by "
                                 f"run {prior.run} (found {found[prior.algorithm]}); fetched again")
                return None
            digests = found
        record.etag, record.last_modified = prior.etag, prior.last_modified
        return digests

    async def _unrecorded(self, record: FileRecord, st: os.stat_result, final: Path, algorithms: tuple[str, ...],
                          head: Head) -> dict[str, str] | None:
        """The digests of a file found without a record, if it can be trusted."""
        expected = record.entry.checksum
        if expected is not None:
            record.note = f"found on disk without a record; it matches the list's {expected.algorithm}"
            return await _hash(final, algorithms)
        try:
            why = _server_disagrees(await head(), st, record)
        except Exception as exc:  # noqa: BLE001 - cannot ask: fetch it
            why = f"the server could not be asked ({exc})"
        if why:
            _replace(record, f"{record.path} was on disk without a record and {why}; fetched again")
            return None
        record.note = "found on disk without a record; its size and date match the server's"
        return await _hash(final, algorithms)

    async def _remote(self, prior: StoredRecord | None, record: FileRecord) -> bool:
        """A remote object is up to date when a HEAD shows the size and digest fetcher
        stored with it; on a store without object metadata (FTP), when its size is the
        one this store's records hold for the URL, whose digest is then reported."""
        assert isinstance(self.target, RemoteTarget) and record.path is not None
        try:
            found = await asyncio.to_thread(self.target.head, record.path)
        except Exception as exc:  # noqa: BLE001 - a store that cannot answer: fetch and upload again
            logger.warning("Cannot check %s in %s: %s", record.path, self.target.describe(), exc)
            return False
        if found is None:
            if prior is not None:
                record.note = (f"{record.path} was recorded by run {prior.run} but is missing from the store; "
                               "fetched again")
            return False
        if not self.target.OBJECT_DIGESTS:  # only the records know the digest: they must vouch for the object
            if prior is None:
                return _replace(record, f"{record.path} is in the store without a record of this URL; fetched again")
            if found.size != prior.size:
                return _replace(record, f"{record.path} in the store is not the object run {prior.run} recorded "
                                        f"({found.size} bytes, recorded {prior.size}); fetched again")
            found = RemoteObject(found.size, prior.algorithm, prior.checksum)
        if not self._matches(found, prior, record):
            return False
        if prior is not None:
            record.etag, record.last_modified = prior.etag, prior.last_modified
            if self._fetched_long_ago(record, prior):
                return False
        record.status, record.size, record.checksum = "uptodate", found.size, found.checksum
        return True

    def _matches(self, found: RemoteObject, prior: StoredRecord | None, record: FileRecord) -> bool:
        """Whether a remote object is the recorded one and the list's, by its stored digest."""
        if found.checksum is None or found.algorithm != self.algorithm:
            if prior is not None:
                record.note = (f"{record.path} in the store has no {self.algorithm} digest of fetcher's "
                               "(another tool's object, or another FETCHER_ALGORITHM); fetched again")
            return False
        if prior is not None and (prior.size, prior.checksum) != (found.size, found.checksum):
            return _replace(record, f"{record.path} in the store is not the object run {prior.run} recorded; "
                                    "fetched again")
        expected = record.entry.checksum
        if expected is not None and (expected.algorithm != found.algorithm or expected.hexdigest != found.checksum):
            return _replace(record, f"{record.path} in the store does not match the list's checksum; fetched again")
        return True

    def _fetched_long_ago(self, record: FileRecord, prior: StoredRecord) -> bool:
        """FILES_EXPIRES: a file whose bytes came more than that many days ago is fetched again."""
        record.fetched_at = prior.fetched_at or prior.finished_at
        if not self.expired(record.fetched_at):
            return False
        record.note = f"{record.path} was fetched more than FILES_EXPIRES ({self.expires} days) ago; fetched again"
        return True

    def expired(self, when: str | float | None) -> bool:
        """Older than FILES_EXPIRES days (stock's rule; 0: always), from a record's
        time or a file's mtime. A record without a time never expires."""
        if when is None:
            return False
        stamp = when if isinstance(when, float) else datetime.fromisoformat(when).timestamp()
        return (time.time() - stamp) / 86400 > self.expires


def _replace(record: FileRecord, note: str) -> bool:
    """A file that is kept no longer: said, and noted in its record. False: not up to date."""
    logger.warning("%s", note)
    record.note = note
    return False


async def _hash(final: Path, algorithms: tuple[str, ...]) -> dict[str, str]:
    try:
        return (await asyncio.to_thread(hash_file, final, algorithms))[1]
    except OSError as exc:
        raise AttemptFailed(f"cannot read {final}: {exc.strerror or exc}", reason="disk error",
                            retryable=False) from exc


def _differences(st: os.stat_result, prior: StoredRecord) -> str:
    """What a stat shows changed in a recorded file, for the record's note."""
    found = []
    if st.st_size != prior.size:
        found.append(f"{st.st_size} bytes, recorded {prior.size}")
    if st.st_mtime_ns != prior.mtime_ns:
        found.append("another modification time")
    return ", ".join(found)


def _server_disagrees(response: Response, st: os.stat_result, record: FileRecord) -> str | None:
    """Whether the server's HEAD says a file found on disk is not its current file
    (another length, or older than its Last-Modified): why not, or None."""
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
