"""aria2's ``split=``: one file fetched as up to N ranges at once.

Each range is a transfer of its own through the download handler (so each
counts in CONCURRENT_REQUESTS and in its host's limit), written in place in the
shared ``.part`` (fetcher.transfer.segments), retried from where it stopped through the
one retry helper (its attempts counted per segment), and resumable in a later
run. The file's digest is that of the whole ``.part`` once every range is in.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fetcher.contract import STREAMED_FLAG
from fetcher.store.writer import Validators
from fetcher.transfer.retry import Action, Attempt, AttemptFailed
from fetcher.transfer.segments import Segment, SegmentSink, SegmentState

if TYPE_CHECKING:
    from scrapy.http import Request, Response

    from fetcher.contract import Sink
    from fetcher.items import FileRecord
    from fetcher.store.writer import HashingWriter
    from fetcher.transfer.retry import Retrier

Download = Callable[["Request", str, "Sink", dict[str, str]], Awaitable["Response"]]
Head = Callable[["Request"], Awaitable["Response"]]


class SplitDownload:
    """One file's ranges: planned from a HEAD, fetched at once, then adopted by the writer."""

    def __init__(self, request: Request, writer: HashingWriter, record: FileRecord, *, split: int, min_size: int,
                 download: Download, head: Head, retrier: Retrier) -> None:
        self.request = request
        self.writer = writer
        self.record = record
        self.split = split
        self.min_size = min_size
        self.download = download
        self.head = head
        self.retrier = retrier

    async def run(self) -> Response | None:
        """The response that announced the file once every range is in the ``.part``; None
        when the file cannot be split (no ranges, too small, no validator, no HEAD)."""
        head = await self._announced()
        if head is None:
            return None
        length = int(head.headers[b"Content-Length"])
        validators = Validators.of(self.record.url, head.headers, length)
        if not validators.if_range():
            return None  # nothing to tell a changed file by: its ranges must not be combined
        state = SegmentState.resume_or_start(self.writer.final, validators, self.split, self.min_size)
        if state.received == 0:
            self.writer.discard()  # a single stream's .part, if any, is not these segments'
        try:
            fd = state.open()
        except OSError as exc:
            raise AttemptFailed(f"cannot write {state.part}: {exc.strerror or exc}", reason="disk error",
                                retryable=False) from exc
        before, self.record.attempts = state.received, 1
        try:
            async with asyncio.TaskGroup() as segments:  # the first segment that fails stops the others
                for segment in state.segments:
                    if not segment.complete:
                        segments.create_task(self._segment(fd, state, segment))
        except* AttemptFailed as failed:
            raise failed.exceptions[0] from None
        finally:
            os.close(fd)
            self.record.received = state.received - before
            state.save()
        await asyncio.to_thread(self.writer.adopt, validators)
        state.remove()
        self.record.http_status = head.status
        return head

    async def _announced(self) -> Response | None:
        """The server's HEAD, if it announces a length worth splitting and takes ranges."""
        try:
            head = await self.head(self.request)
        except Exception:  # noqa: BLE001 - no HEAD: the file is fetched as one stream
            return None
        length = (head.headers.get(b"Content-Length") or b"").strip()
        if head.status != 200 or not length.isdigit():
            return None
        ranges = b"bytes" in (head.headers.get(b"Accept-Ranges") or b"").lower()
        return head if ranges and int(length) >= 2 * self.min_size else None

    async def _segment(self, fd: int, state: SegmentState, segment: Segment) -> None:
        """One segment, retried as a file is (each retry counts in the record's attempts).
        A final failure is the file's: the segments' bytes stay for a resume."""
        retries, times = 0, self.retrier.policy.times_for(self.request.meta)
        what = f"segment {segment.start}-{segment.end - 1} of {self.record.url}"
        while True:
            try:
                await self._attempt(fd, state, segment)
                return
            except AttemptFailed as failed:
                if not await self.retrier.again(failed, retries, times, what):
                    if not failed.keep_part:
                        segment.done = 0
                    raise AttemptFailed(f"segment {segment.start}-{segment.end - 1}: {failed}", reason=failed.reason,
                                        retryable=False, http_status=failed.http_status) from None
            retries += 1
            self.record.attempts += 1

    async def _attempt(self, fd: int, state: SegmentState, segment: Segment) -> None:
        sink = SegmentSink(fd, state.part, segment, state.validators)
        extra = {"Range": segment.range_header(), "If-Range": state.validators.if_range() or ""}
        response = await self.download(self.request, self.request.url, sink, extra)
        verdict = self.retrier.policy.classify(Attempt(status=response.status, streamed=STREAMED_FLAG in response.flags,
                                                       flags=frozenset(response.flags), resumed=True))
        if verdict.action is not Action.DONE:
            raise AttemptFailed.of(verdict, response.status)
        if not segment.complete:  # a short body taken as whole (DOWNLOAD_FAIL_ON_DATALOSS=False): the rest is due
            raise AttemptFailed(f"the segment ended at byte {segment.next} of {segment.end}",
                                reason="length mismatch", retryable=True, http_status=response.status)
