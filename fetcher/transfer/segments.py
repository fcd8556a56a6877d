"""Segmented downloads (aria2's ``split=``): one file fetched as several ranges at once.

Pure logic, no Scrapy: how a file is cut into segments, the sink that writes one
segment in place in the shared ``.part``, and the state file beside it that lets
every segment resume after an interruption, in this run or a later one. The
file's digest is computed over the whole ``.part`` once every segment is in.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fetcher.store.files import open_fd, open_file, write_atomically
from fetcher.store.naming import PART_SUFFIX, SEGMENTS_SUFFIX
from fetcher.store.writer import (
    BodyError,
    LengthMismatch,
    ResumeMismatch,
    StorageError,
    Validators,
    content_range,
)

if TYPE_CHECKING:
    from fetcher.contract import HeadersLike


class RangesRefused(BodyError):
    """The server answered a range request with the whole file: it cannot be split."""

    reason = "ranges refused"


def plan(length: int, split: int, min_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges covering *length* bytes: at most *split* of them and,
    as aria2's ``--min-split-size``, none shorter than *min_size*."""
    count = max(1, min(split, length // max(1, min_size)))
    bounds = [length * i // count for i in range(count + 1)]
    return list(zip(bounds, bounds[1:], strict=False))


@dataclass(slots=True)
class Segment:
    start: int
    end: int  # exclusive
    done: int = 0  # bytes of it on disk

    @property
    def next(self) -> int:
        return self.start + self.done

    @property
    def complete(self) -> bool:
        return self.next >= self.end

    def range_header(self) -> str:
        return f"bytes={self.next}-{self.end - 1}"


class SegmentState:
    """The segments of one ``.part`` and the validators they were fetched under."""

    def __init__(self, final: Path, validators: Validators, segments: list[Segment]) -> None:
        self.path = final.with_name(final.name + SEGMENTS_SUFFIX)
        self.part = final.with_name(final.name + PART_SUFFIX)
        self.validators = validators
        self.segments = segments

    @classmethod
    def resume_or_start(cls, final: Path, validators: Validators, split: int, min_size: int) -> SegmentState:
        """The saved state of this URL's same file (same length and validators), or a new plan."""
        assert validators.length is not None
        state = cls(final, validators, [Segment(s, e) for s, e in plan(validators.length, split, min_size)])
        try:
            with open_file(state.path, "r", encoding="utf-8") as f:
                saved = json.loads(f.read())
            same = (saved["url"], saved["etag"], saved["last_modified"], saved["length"]) == (
                validators.url, validators.etag, validators.last_modified, validators.length)
            if same and state.part.stat().st_size == validators.length:
                state.segments = [Segment(*s) for s in saved["segments"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return state

    @property
    def received(self) -> int:
        return sum(s.done for s in self.segments)

    def open(self) -> int:
        """The ``.part``, sized to the whole file, for the segments' writes."""
        self.part.parent.mkdir(parents=True, exist_ok=True)
        fd = open_fd(self.part, os.O_RDWR | os.O_CREAT)
        try:
            os.ftruncate(fd, self.validators.length or 0)
        except OSError:
            os.close(fd)
            raise
        return fd

    def save(self) -> None:
        """Where each segment is, for a resume (written atomically)."""
        v = self.validators
        data = {"url": v.url, "etag": v.etag, "last_modified": v.last_modified, "length": v.length,
                "segments": [[s.start, s.end, s.done] for s in self.segments]}
        write_atomically(self.path, json.dumps(data).encode())

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


class SegmentSink:
    """A Sink for one segment: a 206 for exactly the range asked, written in place."""

    def __init__(self, fd: int, part: Path, segment: Segment, validators: Validators) -> None:
        self.fd = fd
        self.part = part
        self.segment = segment
        self.validators = validators
        self.expected_size: int | None = None

    def begin(self, status: int, headers: HeadersLike) -> bool:
        if status == 200:
            raise RangesRefused("the server sent the whole file for a range request")
        if status != 206:
            return False
        start, total = content_range(headers)
        if start != self.segment.next:
            raise ResumeMismatch(f"server sent a range at byte {start}, asked for {self.segment.next}")
        now = Validators(self.validators.url, _header(headers, "ETag") or self.validators.etag,
                         _header(headers, "Last-Modified") or self.validators.last_modified, total)
        if self.validators.changed(now):
            raise ResumeMismatch("the file changed on the server while its segments were fetched")
        self.expected_size = self.segment.end - start
        return True

    def write(self, data: bytes) -> None:
        seg = self.segment
        chunk = memoryview(data)[: seg.end - seg.next]
        try:
            os.pwrite(self.fd, chunk, seg.next)
        except OSError as exc:
            raise StorageError(self.part, exc) from exc
        seg.done += len(chunk)

    def finish(self, *, accept_short: bool = False) -> None:
        if not self.segment.complete and not accept_short:
            raise LengthMismatch(f"segment ended at byte {self.segment.next}, expected {self.segment.end}")


def _header(headers: HeadersLike, name: str) -> str | None:
    value = headers.get(name)
    return value.decode("latin-1") if value else None
