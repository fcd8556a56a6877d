"""The hashing writer: a response body goes to ``<final>.part`` and through the
hash in the same pass, and reaches its final name only when it is complete.

No Scrapy here: the download handler feeds it as a ``fetcher.contract.Sink`` (``begin``/``write``/``finish``)
and the pipeline owns it (``prepare``/``commit``/``discard``), so the rules for
resuming, size caps and length checks are testable without a crawler.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from fetcher.store.diskio import Hashes, allocate, hash_into
from fetcher.store.files import open_file, write_atomically
from fetcher.store.naming import META_SUFFIX, PART_SUFFIX
from fetcher.units import human_bytes

if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import Future

    from fetcher.contract import HeadersLike

#: Bodies of at least this size (or of unknown size) get their resume validators on disk as
#: they begin; smaller ones only if they are interrupted (no write per small file).
_META_EAGER = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
#: FETCHER_FILE_ALLOCATION's values, aria2's --file-allocation: "none"; "prealloc" writes zeros
#: over the whole file first; "trunc" sets its length (sparse); "falloc" is posix_fallocate.
ALLOCATIONS = ("none", "prealloc", "trunc", "falloc")
#: Files smaller than this are never preallocated (aria2's --no-file-allocation-limit default).
_ALLOCATE_MIN = 5 << 20
#: Bodies of known length of at least this many bytes are written and hashed on a worker thread
#: (one batch of it: fetcher.store.diskio), so that the event loop only receives. Measured on
#: 200 x 4 MiB (bench B): 4.1 s with bodies under 5 MiB hashed inline, 2.3-2.7 s threaded.
_THREAD_MIN = 1 << 20
#: While a preallocated body flows, its offset is saved in .part.meta this often (seconds): a
#: kill -9 costs at most this long's bytes again (the .part's size says nothing then).
_CHECKPOINT_INTERVAL = 0.25
#: Errors that say the filesystem cannot preallocate (the body is then written as it comes).
_NO_ALLOCATION = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class BodyError(Exception):
    """A body that must not be kept. Each kind says whether trying again can help
    (``retryable``), whether the bytes kept so far can still be continued
    (``keeps_part``), and its short ``reason`` (fetcher/transfer/retry.py reads all three)."""

    retryable = False
    keeps_part = True
    reason = "body error"


class FileTooLarge(BodyError):
    """The body is over FETCHER_MAX_SIZE."""

    reason = "over FETCHER_MAX_SIZE"


class ResumeMismatch(BodyError):
    """The server resumed at another offset than the one asked for: start over."""

    retryable = True
    keeps_part = False
    reason = "bad resume"


class LengthMismatch(BodyError):
    """Fewer or more bytes arrived than the server announced."""

    retryable = True
    reason = "length mismatch"


class StorageError(BodyError):
    """The disk refused the bytes (ENOSPC, EACCES, a path that is a file...)."""

    reason = "disk error"

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"cannot write {path}: {exc.strerror or exc}")
        # Out of file descriptors passes; a full disk or a bad path does not.
        self.retryable = exc.errno in (errno.EMFILE, errno.ENFILE)


class DiskFull(StorageError):
    """Preallocation found the disk too small for the rest of the body: nothing was written,
    and trying again cannot help."""

    keeps_part = False

    def __init__(self, path: Path, exc: OSError, needed: int) -> None:
        super().__init__(path, exc)
        message = f"cannot write {path}: the disk cannot hold {human_bytes(needed)} ({exc.strerror or exc})"
        self.args = (message,)


@dataclass(frozen=True, slots=True)
class Validators:
    """What identifies the version of a body, for ``If-Range`` and revalidation.

    ``length`` is the whole file's length as first announced: a later part
    that belongs to a file of another length is another file, whatever its
    ETag says, and is never spliced onto this one."""

    url: str
    etag: str | None = None
    last_modified: str | None = None
    length: int | None = None

    @classmethod
    def of(cls, url: str, headers: HeadersLike, length: int | None = None) -> Validators:
        """The validators a response's headers give for *url*'s body of *length* bytes."""
        return cls(url, _header_str(headers, "ETag"), _header_str(headers, "Last-Modified"), length)

    def changed(self, other: Validators) -> bool:
        """Whether *other* names another version (a validator both sides have differs)."""
        return bool(
            (self.etag and other.etag and self.etag != other.etag)
            or (self.last_modified and other.last_modified and self.last_modified != other.last_modified)
            or (self.length is not None and other.length is not None and self.length != other.length)
        )

    def conditional(self) -> dict[str, str]:
        """Headers asking for the body only if it changed (revalidation)."""
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers

    def if_range(self) -> str | None:
        # A weak ETag may not be used with If-Range (RFC 9110 13.1.5).
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified


class HashingWriter:
    """Streams one body to ``<final>.part`` while hashing it.

    ``url`` is the URL of the list (not a redirect target), so a later attempt
    or run recognises its own .part. ``algorithms`` are hashlib names: the first
    is the one reported in the manifest, any other one checks an expected
    checksum from the list.
    """

    def __init__(
        self,
        final: Path,
        url: str,
        algorithms: tuple[str, ...],
        *,
        resume: bool = True,
        max_size: int = 0,
        fsync: bool = False,
        allocation: str = "none",
    ) -> None:
        self.final = final
        self.url = url
        self.part = final.with_name(final.name + PART_SUFFIX)
        self.meta = final.with_name(final.name + META_SUFFIX)
        self.algorithms = algorithms
        self.resume = resume
        self.max_size = max_size
        self.fsync = fsync
        self.allocation = allocation  # one of ALLOCATIONS
        self.offset = 0  # bytes already in .part that the next request resumes from
        self.size = 0  # bytes in .part now
        self.expected_size: int | None = None
        self.validators: Validators | None = None
        self._hashes = Hashes(algorithms)
        self._hashed = 0  # how many bytes of .part the hashes cover
        self._file: BinaryIO | None = None
        self.resumed_from = 0  # offset the current body was appended at
        self._meta_pending = False  # the validators of the body being written are not on disk yet
        self._meta_written = False
        self.transferred = 0  # body bytes received over all attempts
        self._allocate_at: int | None = None  # the length to preallocate on the first write
        self._padded = False  # this body's .part was (or may have been) given its whole length
        self._tracks_offset = False  # the .part may be longer than its bytes: its offset is in .part.meta
        self._checkpoint_at = 0.0  # monotonic time of the next offset saved while allocated

    # -- before a request (blocking disk work when there is a prefix to hash)

    def prepare(self) -> None:
        """Find out how much of a previous attempt can be kept.

        The kept prefix is hashed here, once, so the final digest is that of the
        whole file; a prefix whose validators are unknown or whose URL differs
        is dropped, so two versions are never spliced.
        """
        self.close()
        self.offset = 0
        validators, saved = self._read_meta() if self.resume else (None, None)
        self._meta_written = self._meta_written or validators is not None
        try:
            size = self.part.stat().st_size
        except FileNotFoundError:
            size = 0
        if saved is not None:  # a preallocated .part: its size is not what was written
            size = min(size, saved)
        if validators is None or validators.url != self.url or not validators.if_range() or not size:
            self._reset_hashes()
            self.validators = None
            return
        self.validators = validators
        if size != self._hashed:  # not hashed by an earlier attempt of this run
            self._reset_hashes()
            with open_file(self.part, "rb") as f:
                self._hashed = hash_into(f, self._hashes.objects, size)
        self.offset = self._hashed

    def resumable(self) -> bool:
        """Whether the body written so far could be continued by a later request."""
        return self.resume and self.validators is not None and bool(self.validators.if_range())

    def range_headers(self) -> dict[str, str]:
        """Headers that ask for the rest of the body, if there is a prefix to keep."""
        if not self.offset or self.validators is None:
            return {}
        return {"Range": f"bytes={self.offset}-", "If-Range": self.validators.if_range() or ""}

    # -- called by the download handler, on the reactor thread

    def begin(self, status: int, headers: HeadersLike) -> bool:
        """Decide whether the body of this response goes to disk; raise if it must not be kept."""
        if status not in (200, 206):
            return False
        total = _header_int(headers, "Content-Length")
        if status == 206:
            start, total = content_range(headers)
            validators = Validators.of(self.url, headers, total)
            if start != self.offset:
                raise ResumeMismatch(f"server resumed at byte {start}, asked for {self.offset}")
            if self.validators is None or self.validators.changed(validators):
                raise ResumeMismatch("the file changed on the server since the first part was fetched "
                                     f"(now {total if total is not None else 'unknown'} bytes, "
                                     f"first announced {self.validators.length if self.validators else 'unknown'})")
            # A 206 need not repeat every validator: keep the ones it left out.
            validators = Validators(self.url, validators.etag or self.validators.etag,
                                    validators.last_modified or self.validators.last_modified,
                                    self.validators.length if total is None else total)
            self.resumed_from = start
        else:  # a full body: whatever was kept is replaced
            validators = Validators.of(self.url, headers, total)
            self.resumed_from = 0
            self._reset_hashes()
        self.expected_size = total
        if self.max_size and total is not None and total > self.max_size:
            raise FileTooLarge(f"file is {total} bytes, over FETCHER_MAX_SIZE ({self.max_size})")
        self.validators = validators
        try:
            self._file = self._open_part()
            if self.resumed_from:
                self._file.seek(self.resumed_from)
                self._file.truncate()
            self.size = self._hashed = self.resumed_from
            # Preallocated on the first write, once the handler's own size cap passed too.
            self._allocate_at = total if self._allocates(total) else None
            self._padded = False
            self._hashes.threaded = total is not None and total - self.resumed_from >= _THREAD_MIN
            self._hashes.fd = None  # the worker gets this body's file on its first write
            self._tracks_offset = self.resume and self._allocate_at is not None
            self._meta_pending = self.resume
            if self.resume and (total is None or total - self.resumed_from >= _META_EAGER):
                self._save_meta()  # a big body: resumable even after a kill -9 (with its offset, if tracked)
        except OSError as exc:
            raise StorageError(self.part, exc) from exc
        return True

    def _open_part(self) -> BinaryIO:
        """The .part, opened for this body; its folder is made only when missing (the first
        file of a folder: a mkdir and a stat a file saved for every other one)."""
        how = "r+b" if self.resumed_from else "wb"
        try:
            return open_file(self.part, how)
        except FileNotFoundError:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            return open_file(self.part, how)

    def _allocates(self, total: int | None) -> bool:
        """Whether this body's .part is preallocated (FETCHER_FILE_ALLOCATION), never past FETCHER_MAX_SIZE."""
        return (self.allocation != "none" and total is not None and total - self.resumed_from >= _ALLOCATE_MIN
                and not (self.max_size and total > self.max_size))

    def _allocate(self) -> None:
        """Give the .part its whole length before the first byte; a disk too small fails now."""
        assert self._file is not None and self._allocate_at is not None
        total, self._allocate_at = self._allocate_at, None
        self._padded = True  # even if allocating fails part way: commit cuts the .part to its bytes
        try:
            allocate(self._file.fileno(), self.size, total, self.allocation)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(self.part, exc, total - self.size) from exc
            if exc.errno in _NO_ALLOCATION:
                return  # this filesystem cannot: the body is written as it comes
            raise StorageError(self.part, exc) from exc
        self._checkpoint_at = time.monotonic() + _CHECKPOINT_INTERVAL

    def write(self, data: bytes) -> None:
        assert self._file is not None
        size = self.size + len(data)
        if self.max_size and size > self.max_size:
            raise FileTooLarge(f"file is over FETCHER_MAX_SIZE ({self.max_size} bytes)")
        if self._allocate_at is not None:
            self._allocate()
        self.transferred += len(data)
        try:
            if self._hashes.threaded:
                self._hand_over(data)
            else:
                self._file.write(data)
                self._hashes.update(data)
        except OSError as exc:  # a worker's error shows at the next hand-over
            raise StorageError(self.part, exc) from exc
        self.size = self._hashed = size
        if self._tracks_offset and time.monotonic() >= self._checkpoint_at:
            self._checkpoint()

    def ready(self) -> Future[None] | None:
        """What the reader waits for before reading on (``fetcher.contract.Paced``): the disk
        worker's batch when it fell behind, so TCP slows the sender instead of memory filling up;
        None to read on. A worker's write error is raised here, as ``write`` raises it."""
        return self._worker_step(self._hashes.backlog)

    def settle(self) -> Future[None] | None:
        """What the disk worker must still write and hash of the body before ``finish``
        (``fetcher.contract.Paced``): the handler waits for it without holding the reactor, then
        asks again; None once all is in. A worker's write error is raised here, as ``finish``
        raises it."""
        return self._worker_step(self._hashes.settle)

    def _worker_step(self, step: Callable[[], Future[None] | None]) -> Future[None] | None:
        """*step* of the disk worker's hand-over (None for a body hashed inline), a worker's
        OSError raised as the StorageError of this body."""
        if not self._hashes.threaded:
            return None
        try:
            return step()
        except OSError as exc:
            raise StorageError(self.part, exc) from exc

    def _hand_over(self, data: bytes) -> None:
        """A big body's bytes go to the worker, which writes them at their offset and hashes them."""
        assert self._file is not None
        if self._hashes.fd is None:
            self._file.flush()
            self._hashes.fd, self._hashes.at = self._file.fileno(), self.size
        self._hashes.update(data)

    def _checkpoint(self) -> None:
        """Save the offset of a preallocated body: its bytes first, then the number (so a
        kill -9 never leaves an offset past what was written)."""
        assert self._file is not None
        try:
            self._hashes.drain()  # the offset saved is of bytes the worker wrote
            self._file.flush()
            self._save_meta()
        except OSError as exc:
            raise StorageError(self.part, exc) from exc
        self._checkpoint_at = time.monotonic() + _CHECKPOINT_INTERVAL

    def finish(self, *, accept_short: bool = False) -> None:
        """The body ended: check its length against what was announced. With
        *accept_short* (the request asked to keep bodies cut short, as stock
        DOWNLOAD_FAIL_ON_DATALOSS=False does) fewer bytes are the file: its size is what arrived."""
        try:
            self._hashes.drain()
        except OSError as exc:
            raise StorageError(self.part, exc) from exc
        if accept_short and self.expected_size is not None and self.size < self.expected_size:
            return
        if self.expected_size is not None and self.size != self.expected_size:
            raise LengthMismatch(
                f"got {self.size} bytes, the server announced {self.expected_size}"
            )

    def is_complete_part(self, status: int, headers: HeadersLike) -> bool:
        """A 416 to our Range that names our .part's length as the full length:
        the .part already holds the whole file (a run killed before the rename,
        or a body whose end could not be told from a dropped connection)."""
        value = _header_str(headers, "Content-Range") or ""
        return (
            status == 416
            and bool(self.offset)
            and value.strip() == f"bytes */{self.offset}"
            and self.validators is not None
            and not self.validators.changed(Validators.of(self.url, headers, self.offset))
        )

    # -- after the request, owned by the pipeline

    def hexdigests(self) -> dict[str, str]:
        return self._hashes.hexdigests()

    def close(self) -> None:
        """Close the .part file, keeping it (and its validators) for a later resume; a
        preallocated one is cut to the bytes written, never left padded with zeros."""
        flushed = True
        if self._file is not None:
            for step in (self._trim if self._tracks_offset else self._hashes.drain, self._file.close):
                try:
                    step()
                except OSError:  # bytes did not reach the disk: hash the .part again from disk
                    self._hashed, flushed = -1, False
            self._file = None
        if self.size and (self._meta_pending or (self._tracks_offset and flushed)):
            with contextlib.suppress(OSError):  # without them the next attempt starts over: no harm
                self._save_meta()  # (a failed flush keeps the last saved offset)
        self._tracks_offset = False

    def _trim(self) -> None:
        """Cut the open .part to the bytes written (the rest of a preallocation goes); one that
        was never preallocated is that long already, and only its bytes are written out."""
        assert self._file is not None
        self._hashes.drain()
        self._file.flush()
        if self._padded:
            os.ftruncate(self._file.fileno(), self.size)

    def commit(self) -> os.stat_result:
        """Move the complete body to its final name (atomic on one filesystem),
        give it the server's Last-Modified as mtime (as ``wget -N`` and
        ``curl -R`` do), and return its stat for the records."""
        try:
            if self._file is None:  # a .part found complete: reopen it only to fsync it
                if self.fsync:
                    with open_file(self.part, "rb") as f:
                        os.fsync(f.fileno())
            else:
                self._trim()
                if self.fsync:
                    os.fsync(self._file.fileno())
                self._file.close()
                self._file = None
            os.replace(self.part, self.final)
        except OSError as exc:
            raise StorageError(self.final, exc) from exc
        self._meta_pending = self._tracks_offset = False
        if self._meta_written:
            self.meta.unlink(missing_ok=True)
        if self.validators is not None and self.validators.last_modified:
            with contextlib.suppress(TypeError, ValueError, OverflowError, OSError):
                when = parsedate_to_datetime(self.validators.last_modified).timestamp()
                os.utime(self.final, (time.time(), when))
        try:
            return os.stat(self.final)
        except OSError as exc:
            raise StorageError(self.final, exc) from exc

    def adopt(self, validators: Validators) -> None:
        """Take a ``.part`` written by other means (a segmented download) as this
        writer's whole body: hash it, as a resumed prefix is hashed (blocking)."""
        self.close()
        self._reset_hashes()
        with open_file(self.part, "rb") as f:
            self._hashed = hash_into(f, self._hashes.objects)
        self.size = self.offset = self._hashed
        self.validators, self.expected_size = validators, validators.length

    def discard(self) -> None:
        """Drop the partial body: it can never be completed (or must not be)."""
        self._meta_pending = self._tracks_offset = False
        self.close()
        with contextlib.suppress(OSError):  # e.g. a parent that is a file: nothing was written
            self.part.unlink(missing_ok=True)
            self.meta.unlink(missing_ok=True)
        self.offset = 0
        self._reset_hashes()

    def _reset_hashes(self) -> None:
        self._hashes = Hashes(self.algorithms)
        self._hashed = 0

    def _read_meta(self) -> tuple[Validators | None, int | None]:
        """The saved validators, and the saved offset of a preallocated .part (None: its size is it)."""
        try:
            with open_file(self.meta, "r", encoding="utf-8") as f:
                data = json.loads(f.read())
            offset = data.get("offset")
            validators = Validators(data["url"], data.get("etag"), data.get("last_modified"), data.get("length"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None, None
        if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int) or offset < 0):
            return None, None  # an offset that cannot be trusted: nothing of the .part is kept
        return validators, offset

    def _save_meta(self) -> None:
        """Write the validators a later resume needs beside the .part (once per body), and for
        a preallocated one the bytes written so far (its size is the whole file's)."""
        v = self.validators
        assert v is not None
        record: dict[str, Any] = {"url": v.url, "etag": v.etag, "last_modified": v.last_modified, "length": v.length}
        if self._tracks_offset:
            record["offset"] = self.size
        write_atomically(self.meta, json.dumps(record).encode())
        self._meta_pending, self._meta_written = False, True


def _header_str(headers: HeadersLike, name: str) -> str | None:
    value = headers.get(name)
    return value.decode("latin-1") if value else None


def _header_int(headers: HeadersLike, name: str) -> int | None:
    value = _header_str(headers, name)
    return int(value) if value and value.strip().isdigit() else None


def content_range(headers: HeadersLike) -> tuple[int, int | None]:
    """Start offset and full length from a 206's Content-Range."""
    value = _header_str(headers, "Content-Range") or ""
    m = _CONTENT_RANGE.fullmatch(value.strip())
    if not m:
        raise ResumeMismatch(f"206 with an unusable Content-Range {value!r}")
    total = m.group(3)
    return int(m.group(1)), None if total == "*" else int(total)
