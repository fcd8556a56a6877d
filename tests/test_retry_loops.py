"""Every loop that retries goes through fetcher.transfer.retry.Retrier: a file's attempts, a
segment's, an upload's and a list download's. Driven against an operation that always
fails, each shows the same limit (RETRY_TIMES retries), the same backoff, the same
Scrapy stats keys, and ``fetcher/retry_waiting`` back at 0."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from scrapy import Request
from scrapy.statscollectors import StatsCollector
from scrapy.utils.test import get_crawler

from fetcher.config import Config
from fetcher.exceptions import ConnectionRefused
from fetcher.items import FileRecord
from fetcher.listing.sources import ListFetchFailed, ListUnavailable, download
from fetcher.listing.urllist import Entry
from fetcher.store.freshness import Freshness
from fetcher.store.targets import RemoteObject, RemoteTarget
from fetcher.store.writer import HashingWriter, Validators
from fetcher.transfer.attempts import Transfers, _FileTransfer
from fetcher.transfer.retry import Retrier, RetryPolicy
from fetcher.transfer.segments import Segment, SegmentState
from fetcher.transfer.split import SplitDownload

TIMES = 2  # RETRY_TIMES: three attempts in all
URL = "http://127.0.0.1:9/x.bin"  # never contacted: every operation here is a stand-in that fails


class Backoffs:
    """The backoff, recording each delay it was asked for (and keeping the waits short)."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, float | None]] = []

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        self.asked.append((attempt, retry_after))
        return 0.001


class Failing:
    """An operation that fails every time, counting its calls."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.calls = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise self.exc


def run(coro: Awaitable[int]) -> int:
    """Run *coro* on a loop of its own (asyncio.run would leave the thread without one,
    and the handler tests that follow take the current loop)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def retrier() -> tuple[Retrier, StatsCollector, Backoffs]:
    crawler = get_crawler(settings_dict={"RETRY_TIMES": TIMES})
    stats = StatsCollector(crawler)
    backoffs = Backoffs()
    policy = RetryPolicy.from_settings(crawler.settings)
    return Retrier(policy, backoffs, stats, lambda: False), stats, backoffs  # type: ignore[arg-type]


class _Engine:
    def __init__(self, download: Failing) -> None:
        self.download_async = download


class _Crawler:
    def __init__(self, download: Failing) -> None:
        self.engine = _Engine(download)


class _Store(RemoteTarget):
    """A remote store whose uploads always fail."""

    STORE = object
    FORM = SETTINGS = "test"

    def __init__(self, spool: Path) -> None:  # noqa: D107 - no Scrapy store behind it
        self.spool, self.uri, self.calls = spool, "s3://test/", 0

    def _probe(self) -> None: ...

    def head(self, path: str) -> RemoteObject | None:
        return None

    def upload(self, local: Path, path: str, size: int, algorithm: str, checksum: str) -> None:
        self.calls += 1
        raise OSError("the store said no")

    def upload_report(self, local: Path, name: str) -> None: ...


def _transfer(tmp: Path, failing: Failing, r: Retrier, target: Any = None) -> _FileTransfer:
    config = Config.from_settings(get_crawler().settings)
    shared = Transfers(_Crawler(failing), config, target, r, Freshness(target, None, verify="stat", expires=90,  # type: ignore[arg-type]
                                                                       algorithm="md5"), allow_redirects=True)
    entry = Entry(URL, 1)

    async def name(response: Any) -> str:
        return "x.bin"

    return _FileTransfer(shared, Request(URL), entry, "x.bin", tmp / "x.bin", name)


async def file_loop(tmp: Path, r: Retrier) -> int:
    failing = Failing(ConnectionRefused("connection refused by 127.0.0.1:9"))
    transfer = _transfer(tmp, failing, r)
    with pytest.raises(Exception, match="connection refused"):
        await transfer._attempts({})  # noqa: SLF001
    return failing.calls


async def segment_loop(tmp: Path, r: Retrier) -> int:
    failing = Failing(ConnectionRefused("connection refused by 127.0.0.1:9"))
    shared = _transfer(tmp, failing, r).shared  # its download turns errors into verdicts, as in a run
    writer = HashingWriter(tmp / "s.bin", URL, ("md5",))
    job = SplitDownload(Request(URL), writer, FileRecord(Entry(URL, 1), "failed"), split=2, min_size=1,
                        download=shared.download, head=shared.head, retrier=r)
    state = SegmentState(tmp / "s.bin", Validators(URL, '"e"', None, 10), [Segment(0, 10)])
    fd = state.open()
    try:
        with pytest.raises(Exception, match="connection refused"):
            await job._segment(fd, state, state.segments[0])  # noqa: SLF001
    finally:
        os.close(fd)
    return failing.calls


async def upload_loop(tmp: Path, r: Retrier) -> int:
    store = _Store(tmp)
    transfer = _transfer(tmp, Failing(AssertionError("no download here")), r, target=store)
    local = tmp / "x.bin"
    local.write_bytes(b"body")
    transfer.record.path, transfer.record.checksum, transfer.record.size = "x.bin", "d", 4
    with pytest.raises(Exception, match="the store said no"):
        await transfer._upload()  # noqa: SLF001
    return store.calls


async def list_loop(tmp: Path, r: Retrier) -> int:
    failing = Failing(ListFetchFailed("HTTP 503", retryable=True))
    with pytest.raises(ListUnavailable, match="HTTP 503"):
        await download(URL, tmp / "list", failing, r)
    return failing.calls


LOOPS: dict[str, Callable[[Path, Retrier], Awaitable[int]]] = {
    "file": file_loop, "segment": segment_loop, "upload": upload_loop, "list download": list_loop}


@pytest.mark.parametrize("loop", LOOPS)
def test_every_retrying_loop_has_the_same_limit_backoff_and_stats(loop: str, tmp_path: Path) -> None:
    r, stats, backoffs = retrier()
    calls = run(LOOPS[loop](tmp_path, r))
    assert calls == TIMES + 1  # the first attempt and RETRY_TIMES retries
    assert [attempt for attempt, _ in backoffs.asked] == list(range(1, TIMES + 1))  # one backoff before each retry
    counted = stats.get_stats()
    assert counted["retry/count"] == TIMES and counted["retry/max_reached"] == 1, counted
    reasons = {k: v for k, v in counted.items() if k.startswith("retry/reason_count/")}
    assert list(reasons.values()) == [TIMES], counted
    assert counted["fetcher/retry_waiting"] == 0
