"""StreamingDownloadHandler on its own: driven directly against the test origin,
with an in-memory sink, on the asyncio reactor (run by its event loop, no plugin).

What a stock Scrapy project relies on (download_latency, the headers_received and
bytes_received signals, StopDownload, download_maxsize/warnsize, dataloss,
bindaddress, URL credentials) must hold for streamed requests too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import http.server
import logging
import os
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest
from scrapy import Request, signals
from scrapy.exceptions import (
    DownloadConnectionRefusedError,
    ResponseDataLossError,
    StopDownload,
)
from scrapy.http import Response
from scrapy.utils.reactor import (
    install_reactor,
    is_asyncio_reactor_installed,
    is_reactor_installed,
)
from scrapy.utils.test import get_crawler

from fetcher.contract import (
    DATALOSS_FLAG,
    SINK_META,
    STOPPED_FLAG,
    STREAMED_FLAG,
    HeadersLike,
    Sink,
)
from fetcher.handlers import StreamingDownloadHandler
from fetcher.store import diskio
from fetcher.store.writer import FileTooLarge, HashingWriter, StorageError
from tests.conftest import Fetch
from tests.origin import Origin, content_bytes, expected_digest

_T = TypeVar("_T")
KiB = 1024
MiB = 1024 * KiB


class MemorySink:
    """A Sink that keeps the body in memory and records how the handler used it."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.expected_size: int | None = None
        self.chunks: list[bytes] = []
        self.finished: dict[str, bool] | None = None  # finish()'s keywords, once called

    def begin(self, status: int, headers: HeadersLike) -> bool:
        self.status = status
        if status not in (200, 206):
            return False
        length = headers.get("Content-Length")
        self.expected_size = int(length) if length else None
        return True

    def write(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def finish(self, *, accept_short: bool = False) -> None:
        self.finished = {"accept_short": accept_short}

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The asyncio reactor, started without ``reactor.run()``: each test runs its coroutine
    on the reactor's event loop."""
    if not is_reactor_installed():
        install_reactor("twisted.internet.asyncioreactor.AsyncioSelectorReactor")
    elif not is_asyncio_reactor_installed():
        pytest.skip("another Twisted reactor is installed in this process")
    from twisted.internet import reactor as installed

    reactor: Any = installed
    loop = asyncio.get_event_loop()
    if reactor.running:
        yield loop
        return
    reactor.startRunning(installSignalHandlers=False)  # starts the thread pool (name resolution)
    yield loop
    # Its shutdown stops the thread pool (whose threads would keep Python from exiting), then the loop.
    reactor.stop()
    bound = loop.call_later(10, loop.stop)
    loop.run_forever()
    bound.cancel()  # left pending, it would stop the loop under a later test that runs it


def run(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, _T]) -> _T:
    return loop.run_until_complete(asyncio.wait_for(coro, 30))


class Harness:
    """A crawler with an engine (the handler keys its limits on the downloader's slots),
    its StreamingDownloadHandler, and the signals it sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: dict[str, Any] | None = None) -> None:
        self.loop = loop
        self.crawler = get_crawler(settings_dict={"DOWNLOAD_TIMEOUT": 10, **(settings or {})})
        self.crawler.engine = self.crawler._create_engine()
        self.handler = StreamingDownloadHandler(self.crawler)
        self.headers_received: list[dict[str, Any]] = []
        self.bytes_received: list[dict[str, Any]] = []
        self.crawler.signals.connect(lambda **kw: self.headers_received.append(kw), signals.headers_received,
                                     weak=False)
        self.crawler.signals.connect(lambda **kw: self.bytes_received.append(kw), signals.bytes_received,
                                     weak=False)

    def get(self, request: Request) -> Response:
        return run(self.loop, self.handler.download_request(request))

    def close(self) -> None:
        run(self.loop, self.handler.close())


@pytest.fixture
def harness(loop: asyncio.AbstractEventLoop, origin: Origin) -> Iterator[Harness]:
    origin.reset_stats()
    h = Harness(loop)
    yield h
    h.close()


def streamed(url: str, sink: Sink, **meta: Any) -> Request:
    return Request(url, meta={SINK_META: sink, **meta})


def test_body_goes_to_the_sink_not_the_response(harness: Harness, origin: Origin) -> None:
    sink = MemorySink()
    request = streamed(f"{origin.url}/gen/300k/a.bin", sink)
    response = harness.get(request)
    assert response.status == 200 and response.body == b"" and STREAMED_FLAG in response.flags
    assert sink.body == content_bytes("a.bin", 300 * KiB) and sink.finished == {"accept_short": False}
    assert len(sink.chunks) > 1  # it arrived in pieces, as sent
    # As stock: AutoThrottle reads the latency; HTTPCACHE never stores a streamed response.
    assert request.meta["download_latency"] > 0 and request.meta["dont_cache"] is True


@pytest.mark.parametrize("tls", [False, True])
def test_a_big_body_is_read_in_big_pieces(loop: asyncio.AbstractEventLoop, origin: Origin, tls: bool) -> None:
    """Twisted reads its sockets 64 KiB at a time; once a body of 1 MiB or more is announced, its
    connection reads up to 1 MiB (under TLS, the TCP connection below it). Guards
    fetcher._scrapy_private.read_in_pieces, which leans on Twisted's private names."""
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(Origin(tls=True).start()) if tls else origin
        harness = Harness(loop, {"DOWNLOAD_VERIFY_CERTIFICATES": False})
        stack.callback(harness.close)

        def read_sizes() -> list[int]:
            protocols = [p for kept in harness.handler._pool._connections.values() for p in kept]  # noqa: SLF001
            return [getattr(p.transport, "transport", p.transport).bufferSize for p in protocols]

        small = MemorySink()
        harness.get(streamed(f"{server.url}/gen/100k/small.bin", small))
        assert small.body == content_bytes("small.bin", 100 * KiB)
        assert read_sizes() == [64 * KiB]
        big = MemorySink()
        harness.get(streamed(f"{server.url}/gen/3m/big.bin", big))
        assert big.body == content_bytes("big.bin", 3 * 1024 * KiB)
        assert read_sizes() == [1024 * KiB]  # the same connection, kept in the pool


def test_a_request_without_a_sink_goes_to_the_stock_handler(harness: Harness, origin: Origin) -> None:
    response = harness.get(Request(f"{origin.url}/gen/10k/plain.bin"))
    assert response.body == content_bytes("plain.bin", 10 * KiB) and STREAMED_FLAG not in response.flags


def test_error_pages_are_not_streamed(harness: Harness, origin: Origin) -> None:
    sink = MemorySink()
    response = harness.get(streamed(f"{origin.url}/status/404", sink))
    assert response.status == 404 and response.body.startswith(b"404") and STREAMED_FLAG not in response.flags
    assert sink.status == 404 and sink.chunks == [] and sink.finished is None


def test_signals_are_sent_with_stock_arguments(harness: Harness, origin: Origin) -> None:
    request = streamed(f"{origin.url}/gen/200k/sig.bin", MemorySink())
    harness.get(request)
    [headers] = harness.headers_received
    assert headers["request"] is request and headers["spider"] is harness.crawler.spider
    assert headers["body_length"] == 200 * KiB and headers["headers"][b"Content-Length"] == b"204800"
    assert all(kw["request"] is request for kw in harness.bytes_received)
    assert b"".join(kw["data"] for kw in harness.bytes_received) == content_bytes("sig.bin", 200 * KiB)


def stop(fail: bool) -> Any:
    def handler(**_: Any) -> None:
        raise StopDownload(fail=fail)

    return handler


def test_stop_download_from_headers_received_fails_the_request(harness: Harness, origin: Origin) -> None:
    harness.crawler.signals.connect(stop(fail=True), signals.headers_received, weak=False)
    sink = MemorySink()
    with pytest.raises(StopDownload) as caught:
        harness.get(streamed(f"{origin.url}/gen/1m/stop1.bin", sink))
    response = caught.value.response
    assert response is not None and STOPPED_FLAG in response.flags and STREAMED_FLAG not in response.flags
    assert sink.status is None and sink.finished is None  # the sink was never begun


@pytest.mark.parametrize("fail", [False, True])
def test_stop_download_from_bytes_received(harness: Harness, origin: Origin, fail: bool) -> None:
    """As stock: fail=False returns the Response flagged download_stopped, fail=True raises with it.
    Either way the sink is never finished and the response is not marked streamed."""
    harness.crawler.signals.connect(stop(fail=fail), signals.bytes_received, weak=False)
    sink = MemorySink()
    # The origin sends 64 KiB and then holds the rest until the client goes away.
    request = streamed(f"{origin.url}/gen/4m/stop-{fail}.bin?hold=stop-{fail}&hold_at=65536", sink)
    if fail:
        with pytest.raises(StopDownload) as caught:
            harness.get(request)
        response = caught.value.response
    else:
        response = harness.get(request)
    assert response is not None
    assert STOPPED_FLAG in response.flags and STREAMED_FLAG not in response.flags
    assert sink.chunks and len(harness.bytes_received) == 1 and sink.finished is None


def test_download_maxsize_caps_announced_and_growing_bodies(loop: asyncio.AbstractEventLoop,
                                                          origin: Origin) -> None:
    # DOWNLOAD_MAXSIZE is for bodies held in memory: it does not apply to streamed files.
    harness = Harness(loop, {"DOWNLOAD_MAXSIZE": 10 * KiB, "DOWNLOAD_WARNSIZE": 10 * KiB})
    try:
        with pytest.raises(FileTooLarge, match="300000 bytes, over download_maxsize"):
            harness.get(streamed(f"{origin.url}/gen/300000/big.bin", MemorySink(), download_maxsize=100_000))
        sink = MemorySink()
        with pytest.raises(FileTooLarge, match="over download_maxsize"):  # no length announced
            harness.get(streamed(f"{origin.url}/gen/300000/big.bin?chunked=1", sink, download_maxsize=100_000))
        assert len(sink.body) <= 100_000 and sink.finished is None
        sink = MemorySink()
        harness.get(streamed(f"{origin.url}/gen/300000/big.bin?chunked=1", sink, download_maxsize=0))
        assert len(sink.body) == 300_000
    finally:
        harness.close()


def test_download_warnsize_warns_once_per_request(harness: Harness, origin: Origin,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    user_url = origin.url.replace("://", "://alice:s3cret@")
    with caplog.at_level(logging.WARNING, logger="fetcher.handlers"):
        harness.get(streamed(f"{user_url}/gen/300000/warn.bin", MemorySink(), download_warnsize=100_000))
        harness.get(streamed(f"{origin.url}/gen/300000/warn.bin?chunked=1", MemorySink(),
                             download_warnsize=100_000))
        harness.get(streamed(f"{origin.url}/gen/300000/quiet.bin", MemorySink()))
    warnings = [r.getMessage() for r in caplog.records if "download_warnsize" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "Expecting 300000 bytes" in warnings[0] and "s3cret" not in warnings[0]
    assert "Received" in warnings[1]


def test_a_body_cut_short_fails_by_default(harness: Harness, origin: Origin) -> None:
    sink = MemorySink()
    with pytest.raises(ResponseDataLossError):
        harness.get(streamed(f"{origin.url}/gen/1m/cut.bin?drop_at=300000", sink))
    assert sink.finished is None


@pytest.mark.parametrize("where", ["meta", "setting"])
def test_a_body_cut_short_is_kept_when_dataloss_is_accepted(loop: asyncio.AbstractEventLoop, origin: Origin,
                                                            where: str) -> None:
    origin.reset_stats()
    harness = Harness(loop, {"DOWNLOAD_FAIL_ON_DATALOSS": where == "meta"})
    meta = {"download_fail_on_dataloss": False} if where == "meta" else {}
    sink = MemorySink()
    try:
        response = harness.get(streamed(f"{origin.url}/gen/1m/kept-{where}.bin?drop_at=300000", sink, **meta))
    finally:
        harness.close()
    assert response.flags == [STREAMED_FLAG, DATALOSS_FLAG]
    assert sink.body == content_bytes(f"kept-{where}.bin", 300_000) and sink.finished == {"accept_short": True}


class PeerRecorder(http.server.ThreadingHTTPServer):
    """A tiny HTTP server on 127.0.0.1 that remembers each client's address."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorder.peers.append(self.client_address)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def peers() -> Iterator[PeerRecorder]:
    server = PeerRecorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_bindaddress_picks_the_local_address(loop: asyncio.AbstractEventLoop, peers: PeerRecorder) -> None:
    harness = Harness(loop, {"DOWNLOAD_BIND_ADDRESS": "127.0.0.3"})
    try:
        for bind in ("127.0.0.1", "127.0.0.2", ("127.0.0.4", 0), None):
            meta = {"bindaddress": bind} if bind else {}
            sink = MemorySink()
            harness.get(streamed(f"{peers.url}/x", sink, **meta))
            assert sink.body == b"ok"
    finally:
        harness.close()
    assert [host for host, _ in peers.peers] == ["127.0.0.1", "127.0.0.2", "127.0.0.4", "127.0.0.3"]


def test_url_credentials_become_an_authorization_header(harness: Harness, origin: Origin) -> None:
    url = origin.url.replace("://", "://alice:s%40cret@") + "/gen/1k/auth.bin"
    sink = MemorySink()
    harness.get(streamed(url, sink))
    [seen] = origin.stats.snapshot().requests
    assert seen["headers"]["authorization"] == "Basic " + base64.b64encode(b"alice:s@cret").decode()
    assert seen["headers"]["host"] == origin.url.removeprefix("http://") and sink.body
    # A header the request already has wins over the URL's credentials.
    harness.get(streamed(url, MemorySink()).replace(headers={"Authorization": "Bearer t0k"}))
    assert origin.stats.snapshot().requests[-1]["headers"]["authorization"] == "Bearer t0k"


def test_url_credentials_stay_out_of_error_messages(harness: Harness) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadConnectionRefusedError) as caught:
        harness.get(streamed(f"http://alice:s3cret@127.0.0.1:{port}/x", MemorySink()))
    assert str(caught.value) == f"connection refused by 127.0.0.1:{port}"


def test_agents_are_reused(harness: Harness, origin: Origin) -> None:
    for name in ("r1", "r2", "r3"):
        harness.get(streamed(f"{origin.url}/gen/1k/{name}.bin", MemorySink()))
    harness.get(streamed(f"{origin.url}/gen/1k/r4.bin", MemorySink(), download_timeout=7))
    assert len(harness.handler._agents) == 2  # one per (proxy, bind address, connect timeout)
    assert origin.stats.snapshot().connections == 1  # and their connections are pooled


def test_limits_are_keyed_and_sized_as_scrapy_slots(loop: asyncio.AbstractEventLoop, origin: Origin) -> None:
    harness = Harness(loop, {"CONCURRENT_REQUESTS_PER_DOMAIN": 3, "DOWNLOAD_SLOTS": {"slow": {"concurrency": 1}}})
    try:
        limits, downloader = harness.handler._limits, harness.crawler.engine.downloader
        plain = limits.host(Request(f"{origin.url}/a"), downloader)
        assert plain is limits.host(Request(f"{origin.url}/b"), downloader) and plain._value == 3
        slow = limits.host(Request(f"{origin.url}/c", meta={"download_slot": "slow"}), downloader)
        assert slow is not plain and slow._value == 1
    finally:
        harness.close()


def test_streamed_files_never_enter_the_http_cache(fetch: Fetch, origin: Origin, tmp_path: Path) -> None:
    """HTTPCACHE_ENABLED: a cached streamed response would have an empty body (and a cached
    answer would stand in for the server on a rerun or a retry): nothing of them is stored."""
    cache = tmp_path / "httpcache"
    url = f"{origin.url}/gen/64k/cached.bin"
    settings = {"HTTPCACHE_ENABLED": True, "HTTPCACHE_DIR": str(cache)}
    first = fetch(f"{url}\n", settings=settings)
    assert first.returncode == 0, first.log
    assert first.record(url)["checksum"] == expected_digest("cached.bin", 64 * KiB)
    second = fetch(f"{url}\n", settings={**settings, "FETCHER_REVALIDATE": True})  # asks the server again
    assert second.returncode == 0, second.log
    assert second.record(url)["status"] == "uptodate" and second.record(url)["http_status"] == 304
    assert origin.stats.hits_by_path["/gen/64k/cached.bin"] == 2
    assert [p for p in cache.rglob("*") if p.is_file()] == []


class SlowSink(MemorySink):
    """A sink whose disk falls behind: after every *every* bytes, ``ready`` stays pending for
    *delay* seconds. It records the origin's bytes sent early in each wait and at its end."""

    def __init__(self, origin: Origin, every: int, delay: float, waits: int) -> None:
        super().__init__()
        self.origin, self.every, self.delay, self.waits_left = origin, every, delay, waits
        self.unpaced = 0
        self.pending: Future[None] | None = None
        self.sent_during: list[tuple[int, int]] = []  # origin bytes_sent 0.15 s into a wait, and at its end

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unpaced += len(data)

    def ready(self) -> Future[None] | None:
        if self.pending is not None and not self.pending.done():
            return self.pending
        if self.unpaced < self.every or not self.waits_left:
            return None
        self.unpaced, self.waits_left = 0, self.waits_left - 1
        self.pending = Future()
        threading.Thread(target=self._catch_up, args=(self.pending,), daemon=True).start()
        return self.pending

    def _catch_up(self, pending: Future[None]) -> None:
        time.sleep(0.15)  # the kernel's buffers fill up within this on loopback
        early = self.origin.stats.bytes_sent
        time.sleep(self.delay - 0.15)
        self.sent_during.append((early, self.origin.stats.bytes_sent))
        pending.set_result(None)


def test_a_sink_that_falls_behind_pauses_the_transport(loop: asyncio.AbstractEventLoop, origin: Origin) -> None:
    """While the sink's ``ready`` is pending the socket is not read (the origin stops sending:
    TCP slowed it), the wait is no stall though longer than FETCHER_STALL_TIMEOUT, and the body
    arrives whole."""
    size = 48 * MiB
    origin.reset_stats()
    harness = Harness(loop, {"FETCHER_STALL_TIMEOUT": 0.25})
    sink = SlowSink(origin, every=4 * MiB, delay=0.5, waits=3)
    try:
        response = harness.get(streamed(f"{origin.url}/gen/{size}/slow.bin", sink))
    finally:
        harness.close()
    assert response.status == 200 and sink.finished == {"accept_short": False}
    assert sink.body == content_bytes("slow.bin", size)
    assert len(sink.sent_during) == 3
    early, late = sink.sent_during[0]
    assert early < size and late == early, sink.sent_during  # paused: nothing more was sent


def test_a_disk_worker_error_fails_the_transfer_at_once(loop: asyncio.AbstractEventLoop, origin: Origin,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A big body's bytes are written by a worker thread: its ENOSPC still ends the transfer
    as soon as it happens, with the disk's reason, while the reader waits for that worker."""

    def full_disk(fd: int, data: Any, at: int) -> int:
        time.sleep(0.3)  # the worker falls behind first: the reader is paused when it fails
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(diskio.os, "pwrite", full_disk)
    size = 256 * MiB
    origin.reset_stats()
    harness = Harness(loop, {"FETCHER_STALL_TIMEOUT": 0.1})
    writer = HashingWriter(tmp_path / "full.bin", f"{origin.url}/gen/{size}/full.bin", ("sha256",))
    writer.prepare()
    started = time.monotonic()
    try:
        with pytest.raises(StorageError, match="No space left on device"):
            harness.get(streamed(f"{origin.url}/gen/{size}/full.bin", writer))
    finally:
        writer.discard()
        harness.close()
    assert time.monotonic() - started < 3
    assert origin.stats.bytes_sent < 32 * MiB  # stopped at once, not after the whole body


class SettlingSink(MemorySink):
    """A sink whose disk worker still writes the body's end when the body ended: its first
    ``settle`` is pending for 0.3 s (a reactor timer of 0.05 s set meanwhile), the next says
    done; or it raises *error*. It records the order of what happened."""

    def __init__(self, reactor: Any, error: Exception | None = None) -> None:
        super().__init__()
        self.reactor, self.error = reactor, error
        self.events: list[str] = []
        self.pending: Future[None] | None = None

    def settle(self) -> Future[None] | None:
        if self.error is not None:
            raise self.error
        if self.pending is not None:
            self.events.append("settled" if self.pending.done() else "asked while pending")
            return None
        self.events.append("settle")
        self.pending = Future()
        self.reactor.callLater(0.05, self.events.append, "reactor timer")
        threading.Timer(0.3, self.pending.set_result, (None,)).start()
        return self.pending

    def finish(self, *, accept_short: bool = False) -> None:
        self.events.append("finish")
        super().finish(accept_short=accept_short)


def test_the_end_of_a_body_is_awaited_without_holding_the_reactor(harness: Harness, origin: Origin) -> None:
    """Once a body ended, the handler waits for its sink's disk worker (``settle``) before
    ``finish``, and the reactor runs meanwhile (a worker slower than the network kept the
    reactor thread from the other transfers: 0.2 s on 200 x 4 MiB)."""
    from twisted.internet import reactor

    sink = SettlingSink(reactor)
    response = harness.get(streamed(f"{origin.url}/gen/2m/settle.bin", sink))
    assert response.status == 200 and sink.body == content_bytes("settle.bin", 2 * MiB)
    assert sink.events == ["settle", "reactor timer", "settled", "finish"]


def test_a_write_error_found_at_the_body_end_fails_the_transfer(harness: Harness, origin: Origin,
                                                                tmp_path: Path) -> None:
    """A disk worker's error that ``settle`` raises fails the transfer as ``finish`` would."""
    from twisted.internet import reactor

    error = StorageError(tmp_path / "x.part", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    sink = SettlingSink(reactor, error)
    with pytest.raises(StorageError, match="No space left on device"):
        harness.get(streamed(f"{origin.url}/gen/2m/settle-error.bin", sink))
    assert sink.finished is None
