"""Download handler that streams response bodies into a sink instead of memory.

Every stock Scrapy HTTP handler buffers the whole body. A request whose
``meta["fetcher_sink"]`` holds a :class:`~fetcher.writer.Sink` (the pipeline's
HashingWriter) is fetched here with Twisted's Agent and each chunk goes straight
to that sink; the Response handed back has an empty body. Every other request is
passed to the stock handler, so the handler can replace ``http``/``https`` in
any project's DOWNLOAD_HANDLERS.

Streamed requests keep what stock HTTP11DownloadHandler does with a request:
proxies (meta ``proxy``, e.g. from HttpProxyMiddleware and http_proxy/https_proxy;
https through a CONNECT tunnel), meta ``bindaddress`` and DOWNLOAD_BIND_ADDRESS,
``download_latency``, the headers_received/bytes_received signals and StopDownload,
DOWNLOAD_FAIL_ON_DATALOSS (setting or meta ``download_fail_on_dataloss``), and the
meta keys ``download_maxsize``/``download_warnsize``. The settings DOWNLOAD_MAXSIZE
and DOWNLOAD_WARNSIZE are for bodies held in memory and do not apply to streamed
files (FETCHER_MAX_SIZE does). A URL's user:password becomes an Authorization
header and never goes on the wire or into a message.

Timeouts for streamed requests: DOWNLOAD_TIMEOUT (or meta ``download_timeout``)
bounds connecting plus waiting for the response headers; FETCHER_STALL_TIMEOUT
bounds every silence while the body flows; FETCHER_MAX_TIME, when set, bounds
the whole request. A large file that keeps flowing is never cut for being long.

Bandwidth caps for streamed bodies: FETCHER_MAX_RATE (all transfers of the crawl,
as aria2's --max-overall-download-limit and wget's --limit-rate) and
FETCHER_MAX_RATE_PER_HOST (each downloader slot, keyed as Scrapy keys it), in bytes
a second. Each chunk is charged to token buckets (fetcher.ratelimit); over a cap,
the transfer stops reading its socket until the debt is paid, so nothing waits in
memory and TCP slows the sender. A paused transfer is not a stalled one. Unset, no
bucket exists and a chunk costs one test. Requests that are not streamed (handed
to the stock handler) are not counted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import resource
import weakref
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urldefrag, urlparse, urlsplit

from OpenSSL import SSL
from scrapy import signals
from scrapy.core.downloader.handlers.base import BaseDownloadHandler
from scrapy.core.downloader.handlers.http11 import HTTP11DownloadHandler
from scrapy.exceptions import (
    CannotResolveHostError,
    CloseSpider,
    DownloadConnectionRefusedError,
    DownloadFailedError,
    DownloadTimeoutError,
    NotConfigured,
    NotSupported,
    ResponseDataLossError,
    StopDownload,
)
from scrapy.http import Headers, Response
from scrapy.utils.defer import maybe_deferred_to_future
from scrapy.utils.httpobj import urlparse_cached
from scrapy.utils.misc import build_from_crawler
from scrapy.utils.url import add_http_if_no_scheme
from twisted.internet import error as txerror
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers as TxHeaders
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from fetcher._scrapy_private import (
    direct_agent,
    proxy_agent,
    tls_policy,
    tunneling_agent,
)
from fetcher.addon import DEFAULTS
from fetcher.exceptions import StartupError
from fetcher.ratelimit import TokenBucket, parse_rate
from fetcher.redact import host_of, safe_url
from fetcher.writer import BodyError, FileTooLarge

if TYPE_CHECKING:
    from collections.abc import Callable

    from scrapy import Request
    from scrapy.core.downloader import Downloader
    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings
    from scrapy.statscollectors import StatsCollector
    from twisted.internet.base import DelayedCall
    from twisted.web.client import Agent
    from twisted.web.client import Response as TxResponse

    from fetcher.writer import Sink

logger = logging.getLogger(__name__)

SINK_META = "fetcher_sink"
#: Flag on responses whose body went to the sink.
STREAMED_FLAG = "fetcher:streamed"
#: Flag on streamed responses that ended with the connection, with no length to check.
UNVERIFIED_END_FLAG = "fetcher:unverified-end"
#: Stock's flags: a StopDownload from a signal handler ended the body; a body cut short was kept.
STOPPED_FLAG = "download_stopped"
DATALOSS_FLAG = "dataloss"
_RESERVED_FDS = 64  # descriptors Scrapy, the reactor, logs and the manifest need besides transfers
#: How much of a body that is not streamed (an error page) is kept.
_ERROR_BODY_LIMIT = 64 * 1024
#: Agents kept for reuse (one per proxy, bind address and connect timeout); a bound, not a tuning knob.
_AGENTS_KEPT = 64


# The errors of streamed requests: Scrapy's own classes (so RETRY_EXCEPTIONS still
# names them), each with the short reason the summary groups failures by.


class DNSLookupFailed(CannotResolveHostError):
    reason = "DNS lookup failed"


class ConnectionRefused(DownloadConnectionRefusedError):
    reason = "connection refused"


class Timeout(DownloadTimeoutError):
    """No connection or no response headers within DOWNLOAD_TIMEOUT, or over FETCHER_MAX_TIME."""

    reason = "timeout"


class StallTimeoutError(Timeout):
    """No body bytes arrived for FETCHER_STALL_TIMEOUT seconds."""

    reason = "stall timeout"


class ConnectionFailed(DownloadFailedError):
    reason = "connection failed"


class ConnectionLost(ResponseDataLossError):
    """The connection ended before the body did."""

    reason = "connection lost mid-body"


class TLSError(Exception):
    """The TLS handshake failed (a certificate that does not verify): retrying cannot help."""

    reason = "TLS error"


class _TransferLimits:
    """The transfer limits of one crawl, shared by its http and https handlers.

    Scrapy enforces CONCURRENT_REQUESTS only for requests from its scheduler (the
    pipeline's do not come from there), and with the asyncio reactor its
    downloader starts every request queued in one loop iteration, whatever
    CONCURRENT_REQUESTS_PER_DOMAIN says. Streamed transfers are bounded here
    instead: first by downloader slot, so that one waiting behind its host holds
    no global slot, then in all.

    The bandwidth caps live here too: one token bucket for the crawl
    (FETCHER_MAX_RATE) and one per downloader slot (FETCHER_MAX_RATE_PER_HOST),
    none when unset. A bad value is *error*, and the crawl does not start."""

    _by_crawler: weakref.WeakKeyDictionary[Crawler, _TransferLimits] = weakref.WeakKeyDictionary()

    def __init__(self, settings: BaseSettings) -> None:
        self.total = asyncio.Semaphore(_fitting_concurrency(settings.getint("CONCURRENT_REQUESTS")))
        self._per_slot = settings.getint("CONCURRENT_REQUESTS_PER_IP") or settings.getint(
            "CONCURRENT_REQUESTS_PER_DOMAIN")
        self._slot_settings = settings.getdict("DOWNLOAD_SLOTS")
        self._slots: dict[str, asyncio.Semaphore] = {}
        self.error: StartupError | None = None
        # Unset, the stall timeout is DOWNLOAD_TIMEOUT, as wget's --timeout covers reads too.
        self.stall_timeout = self.max_time = 0.0
        try:
            rate = parse_rate("FETCHER_MAX_RATE", settings.get("FETCHER_MAX_RATE", DEFAULTS["FETCHER_MAX_RATE"]))
            self._host_rate = parse_rate("FETCHER_MAX_RATE_PER_HOST", settings.get(
                "FETCHER_MAX_RATE_PER_HOST", DEFAULTS["FETCHER_MAX_RATE_PER_HOST"]))
            stall = settings.get("FETCHER_STALL_TIMEOUT", DEFAULTS["FETCHER_STALL_TIMEOUT"])
            self.stall_timeout = settings.getfloat("DOWNLOAD_TIMEOUT") if stall in (None, "") else _seconds(
                "FETCHER_STALL_TIMEOUT", stall)
            self.max_time = _seconds("FETCHER_MAX_TIME", settings.get("FETCHER_MAX_TIME", DEFAULTS["FETCHER_MAX_TIME"]))
        except ValueError as exc:
            self.error = StartupError(str(exc))
            rate = self._host_rate = 0.0
        self._rate_total = TokenBucket(rate, now=monotonic()) if rate else None
        self._rate_slots: dict[str, TokenBucket] = {}

    @classmethod
    def of(cls, crawler: Crawler) -> _TransferLimits:
        if crawler not in cls._by_crawler:
            limits = cls._by_crawler[crawler] = cls(crawler.settings)
            if limits.error is not None:
                # Scrapy keeps a download handler that raises as "not configured" and runs on,
                # failing every file: instead the crawl is closed before its first request.
                logger.error("Cannot start: %s", limits.error)
                crawler.signals.connect(_refuse_to_open, signal=signals.spider_opened, weak=False)
        return cls._by_crawler[crawler]

    def host(self, request: Request, downloader: Downloader) -> asyncio.Semaphore:
        """One semaphore per downloader slot, keyed as Scrapy keys it (meta download_slot,
        or the host, or its IP with CONCURRENT_REQUESTS_PER_IP) and sized as Scrapy sizes it
        (DOWNLOAD_SLOTS concurrency, else CONCURRENT_REQUESTS_PER_IP, else _PER_DOMAIN)."""
        key = downloader.get_slot_key(request)
        if key not in self._slots:
            size = self._slot_settings.get(key, {}).get("concurrency", self._per_slot)
            self._slots[key] = asyncio.Semaphore(max(1, int(size)))
        return self._slots[key]

    def buckets(self, request: Request, downloader: Downloader) -> tuple[TokenBucket, ...] | None:
        """The bandwidth caps a transfer is charged to (the crawl's, its slot's); None when
        there are none."""
        if self._host_rate:
            key = downloader.get_slot_key(request)
            host = self._rate_slots.get(key)
            if host is None:
                host = self._rate_slots[key] = TokenBucket(self._host_rate, now=monotonic())
            return (host,) if self._rate_total is None else (self._rate_total, host)
        return None if self._rate_total is None else (self._rate_total,)


def _seconds(name: str, value: object) -> float:
    """A duration setting: a number of seconds, 0 or more."""
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"{name} must be a number of seconds (0 or more), not {value!r}")
    return seconds


def _refuse_to_open(spider: object) -> None:
    """spider_opened while a transfer setting is bad: close the crawl before it starts
    (the reason was logged when the handler was made)."""
    raise CloseSpider("bad_settings")


@dataclass(frozen=True, slots=True)
class _BodyRules:
    """What bounds one body while it flows."""

    stall_timeout: float  # seconds of silence (0: none)
    maxsize: int  # body bytes (0: no cap)
    warnsize: int  # body bytes past which one warning is logged (0: none)
    fail_on_dataloss: bool


@dataclass(frozen=True, slots=True)
class _Ended:
    """How a body ended without an error."""

    body: bytes = b""  # the kept start of an error page; empty when streamed
    unverified: bool = False  # with the connection, and no length to check it against
    dataloss: bool = False  # cut short, kept as DOWNLOAD_FAIL_ON_DATALOSS=False asks
    stopped: StopDownload | None = None  # by a bytes_received handler


class StreamingDownloadHandler(BaseDownloadHandler):
    """``http``/``https`` handler: streams requests that carry a sink, delegates the rest."""

    def __init__(self, crawler: Crawler) -> None:
        if not crawler.settings.getbool("TWISTED_REACTOR_ENABLED", True):
            raise NotConfigured("StreamingDownloadHandler needs a Twisted reactor")
        super().__init__(crawler)
        from twisted.internet import reactor

        self._reactor: Any = reactor
        settings = crawler.settings
        self._fallback = build_from_crawler(HTTP11DownloadHandler, crawler)
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = settings.getint("CONCURRENT_REQUESTS_PER_DOMAIN")
        self._tls = tls_policy(crawler)
        self._agents: dict[tuple[Any, ...], Agent] = {}
        self._bind_address = settings.get("DOWNLOAD_BIND_ADDRESS")
        self._fail_on_dataloss = settings.getbool("DOWNLOAD_FAIL_ON_DATALOSS")
        self._timeout = settings.getfloat("DOWNLOAD_TIMEOUT")
        self._limits = _TransferLimits.of(crawler)  # and the transfer settings, checked once
        self._stall_timeout, self._max_time = self._limits.stall_timeout, self._limits.max_time

    async def download_request(self, request: Request) -> Response:
        sink: Sink | None = request.meta.get(SINK_META)
        if sink is None:
            return await self._fallback.download_request(request)
        engine = self.crawler.engine
        assert engine is not None  # requests reach handlers through the engine's downloader
        stats = self.crawler.stats
        assert stats is not None
        if self._limits.error is not None:  # the crawl is being refused: never fetch past a bad cap
            raise self._limits.error
        buckets = self._limits.buckets(request, engine.downloader)
        # The slot's limit first: a request waiting behind its host holds no global slot.
        async with self._limits.host(request, engine.downloader), self._limits.total:
            stats.inc_value("fetcher/active")
            try:
                return await self._stream(request, sink, stats, buckets)
            except (BodyError, DownloadTimeoutError, StopDownload):
                raise
            except Exception as exc:
                readable = _readable(exc, request)
                if readable is exc:  # already Scrapy's (TunnelError, NotSupported...)
                    raise
                raise readable from exc
            finally:
                stats.inc_value("fetcher/active", -1)

    async def close(self) -> None:
        await self._fallback.close()
        d = self._pool.closeCachedConnections()
        # closeCachedConnections can hang on a dead peer: give it a second, as stock does.
        call = self._reactor.callLater(1, d.callback, None)
        await maybe_deferred_to_future(d)
        if call.active():
            call.cancel()

    async def _stream(self, request: Request, sink: Sink, stats: StatsCollector,
                      buckets: tuple[TokenBucket, ...] | None) -> Response:
        meta = request.meta
        # Never into HTTPCACHE: a streamed body is not in the Response, and a cached error
        # page would answer every retry. (HttpCacheMiddleware.process_response reads this.)
        meta["dont_cache"] = True
        timeout = float(meta.get("download_timeout") or self._timeout)
        url = urldefrag(request.url)[0]
        target, authorization = _split_credentials(url)
        agent, via = self._agent(request, timeout)
        headers_out = TxHeaders(dict(request.headers.items()))
        if via != "proxy":  # Proxy-* headers are for a proxy; a tunnel sends them in the CONNECT only
            for name in list(request.headers):
                if name.lower().startswith(b"proxy-"):
                    headers_out.removeHeader(name)
        if authorization and not request.headers.get(b"Authorization"):
            headers_out.setRawHeaders(b"Authorization", [authorization])
        started = monotonic()
        d: Deferred[IResponse] = agent.request(request.method.encode(), target.encode("ascii"), headers_out, None)
        headers_call = self._reactor.callLater(timeout, d.cancel)
        try:
            txresponse = cast("TxResponse", await maybe_deferred_to_future(d))
        except Exception as exc:
            if not headers_call.active():  # our cancel fired: Twisted wraps it in various ways
                raise Timeout(f"no response within {timeout:g} s (DOWNLOAD_TIMEOUT)") from exc
            raise
        finally:
            if headers_call.active():
                headers_call.cancel()
        meta["download_latency"] = monotonic() - started  # as stock: AutoThrottle reads it
        headers = Headers()
        if txresponse.length != UNKNOWN_LENGTH:
            headers[b"Content-Length"] = str(txresponse.length).encode()
        headers.update(txresponse.headers.getAllRawHeaders())
        status = int(txresponse.code)
        has_body = request.method != "HEAD" and txresponse.length != 0 and status not in (204, 304)

        def respond(body: bytes, flags: list[str], stopped: StopDownload | None = None) -> Response:
            return _respond(request, url, status, headers, body, flags, txresponse, stopped)

        stopped = self._send(signals.headers_received, request, headers=headers, body_length=txresponse.length)
        if stopped is not None:
            if has_body:
                txresponse.deliverBody(_Discard())
            return respond(b"", [], stopped)
        rules = _BodyRules(
            stall_timeout=self._stall_timeout,
            maxsize=int(meta.get("download_maxsize") or 0),
            warnsize=int(meta.get("download_warnsize") or 0),
            fail_on_dataloss=bool(meta.get("download_fail_on_dataloss", self._fail_on_dataloss)),
        )
        try:
            streaming = request.method != "HEAD" and sink.begin(status, headers)
            announced = sink.expected_size if streaming else None
            if announced is not None and rules.maxsize and announced > rules.maxsize:
                raise FileTooLarge(f"file is {announced} bytes, over download_maxsize ({rules.maxsize})")
        except BaseException:
            if has_body:  # nobody will read this body: close the connection instead of leaking it
                txresponse.deliverBody(_Discard())
            raise
        warned = announced is not None and bool(rules.warnsize) and announced > rules.warnsize
        if warned:
            _warn_size(request, cast("int", announced), rules.warnsize, expected=True)
        ended = _Ended()
        if has_body:
            # Cancelled (the engine closing): stop the transfer rather than leave it draining.
            finished: Deferred[_Ended] = Deferred(lambda _: reader.stop())
            reader = _BodyReader(
                finished, sink if streaming else None, request, rules, warned=warned, reactor=self._reactor,
                stats=stats, send=lambda data: self._send(signals.bytes_received, request, data=data),
                buckets=buckets,
            )
            txresponse.deliverBody(reader)
            max_call = (
                self._reactor.callLater(self._max_time, reader.fail, Timeout(
                    f"download took longer than {self._max_time:g} s (FETCHER_MAX_TIME)"))
                if self._max_time else None
            )
            try:
                ended = await maybe_deferred_to_future(finished)
            finally:
                if max_call is not None and max_call.active():
                    max_call.cancel()
        if streaming:
            # The bytes on disk are the ones sent; no middleware may decode an empty body.
            headers.pop(b"Content-Encoding", None)
        if ended.stopped is not None:  # not finished: the sink holds only part of the body
            return respond(ended.body, [], ended.stopped)
        flags = [STREAMED_FLAG] if streaming else []
        if ended.dataloss:
            flags.append(DATALOSS_FLAG)
        # Checkable only where the server takes ranges; a 206 told the full length already.
        accepts_ranges = b"bytes" in (headers.get(b"Accept-Ranges") or b"").lower()
        if ended.unverified and streaming and sink.expected_size is None and accepts_ranges:
            flags.append(UNVERIFIED_END_FLAG)
        if streaming:
            sink.finish(accept_short=ended.dataloss)
        return respond(ended.body, flags)

    def _agent(self, request: Request, timeout: float) -> tuple[Agent, str]:
        """The Agent for this request, as stock ``ScrapyAgent._get_agent`` picks it, and how
        it connects ("direct", "proxy" or "tunnel"). Agents are kept per proxy, bind
        address and connect timeout: building one per request costs CPU on many small
        files. They all share one connection pool."""
        bind = _bind_address(request.meta.get("bindaddress") or self._bind_address)
        proxy = request.meta.get("proxy")
        if not proxy:
            key: tuple[Any, ...] = ("direct", bind, timeout)
        else:
            parsed = urlparse(add_http_if_no_scheme(proxy))
            hostport = parsed.netloc.rpartition("@")[2]  # credentials travel in Proxy-Authorization
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            if urlparse_cached(request).scheme == "https":
                if parsed.scheme == "https":
                    raise NotSupported("an https:// proxy for https:// URLs is not supported (nor is it by "
                                       "Scrapy's own handler): use an http:// proxy, which tunnels with CONNECT")
                # The credentials are part of the tunnel (and of its pooled connections' key).
                key = ("tunnel", parsed.hostname, port, request.headers.get(b"Proxy-Authorization"), bind, timeout)
            else:
                key = ("proxy", f"{parsed.scheme}://{hostport}", bind, timeout)
        agent = self._agents.get(key)
        if agent is None:
            if len(self._agents) >= _AGENTS_KEPT:
                del self._agents[next(iter(self._agents))]
            agent = self._agents[key] = self._build_agent(key)
        return agent, key[0]

    def _build_agent(self, key: tuple[Any, ...]) -> Agent:
        via, *where, bind, timeout = key
        common: dict[str, Any] = {"connect_timeout": timeout, "bind_address": bind, "pool": self._pool}
        if via == "tunnel":
            return tunneling_agent(self._reactor, self._tls, proxy=cast("tuple[str, int, bytes | None]", tuple(where)),
                                   **common)
        if via == "proxy":
            return proxy_agent(self._reactor, self._tls, proxy_uri=where[0].encode("ascii"), **common)
        return direct_agent(self._reactor, self._tls, **common)

    def _send(self, signal: object, request: Request, **kwargs: Any) -> StopDownload | None:
        """Send headers_received/bytes_received as stock does; the StopDownload a handler raised, if any."""
        for receiver, result in self.crawler.signals.send_catch_log(
            signal=signal, request=request, spider=self.crawler.spider, **kwargs
        ):
            if isinstance(result, Failure) and isinstance(result.value, StopDownload):
                logger.debug("Download of %s stopped by signal handler %s",
                             safe_url(request.url), getattr(receiver, "__qualname__", receiver))
                return result.value
        return None


class _Discard(Protocol):
    """Closes a response body nobody wants, so its connection is not left open."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()


class _BodyReader(Protocol):
    """Feeds body chunks to the sink (or keeps a bounded error body), sends
    bytes_received, watches for stalls and the size cap, and keeps to the
    bandwidth caps by pausing its transport.

    Fires *finished* with how the body ended, or errs with why it was cut."""

    def __init__(
        self,
        finished: Deferred[_Ended],
        sink: Sink | None,
        request: Request,
        rules: _BodyRules,
        *,
        warned: bool,
        reactor: Any,
        stats: StatsCollector,
        send: Callable[[bytes], StopDownload | None],
        buckets: tuple[TokenBucket, ...] | None = None,
    ) -> None:
        self._finished = finished
        self._sink = sink
        self._request = request
        self._rules = rules
        self._warned = warned
        self._stats = stats  # fetcher/bytes_received moves as bytes arrive: the progress display reads it
        self._send = send  # bytes_received
        self._buffer = bytearray()
        self._received = 0
        self._stall_call: DelayedCall | None = (
            reactor.callLater(rules.stall_timeout, self._stalled) if rules.stall_timeout else None
        )
        self._reactor = reactor
        self._buckets = buckets  # the bandwidth caps; None: none, and nothing to do per chunk
        self._resume_call: DelayedCall | None = None  # while paused for a cap

    def dataReceived(self, data: bytes) -> None:
        if self._finished.called:
            return
        self._received += len(data)
        if self._stall_call is not None:
            self._stall_call.reset(self._rules.stall_timeout)
        if self._sink is None:  # an error page: keep its start
            self._buffer += data[: _ERROR_BODY_LIMIT - len(self._buffer)]
        else:
            maxsize = self._rules.maxsize
            if maxsize and self._received > maxsize:
                self.fail(FileTooLarge(f"file is over download_maxsize ({maxsize} body bytes)"))
                return
            try:
                self._sink.write(data)
            except Exception as exc:  # disk full, size cap: stop the transfer, report why
                self.fail(exc)
                return
            self._stats.inc_value("fetcher/bytes_received", len(data))
            warnsize = self._rules.warnsize
            if warnsize and not self._warned and self._received > warnsize:
                self._warned = True
                _warn_size(self._request, self._received, warnsize, expected=False)
        stopped = self._send(data)
        if stopped is not None:
            self._end(stopped=stopped)
            self.stop()
        elif len(self._buffer) >= _ERROR_BODY_LIMIT:  # the rest of an error page is not worth reading
            self._end()
            self.stop()
        elif self._buckets is not None:
            self._pace(len(data))

    def _pace(self, n: int) -> None:
        """Charge *n* received bytes to every cap; over one, stop reading the socket
        until its debt is paid (the bytes wait in the kernel, then TCP slows the sender)."""
        now = monotonic()
        wait = 0.0
        for bucket in cast("tuple[TokenBucket, ...]", self._buckets):
            wait = max(wait, bucket.take(n, now))
        if not wait:
            return
        assert self.transport is not None
        # Every time, not only when the pause begins: Twisted resumes the transport itself
        # after replaying the chunks that arrived before the body had a reader.
        self.transport.pauseProducing()
        call = self._resume_call
        if call is None:
            self._resume_call = self._reactor.callLater(wait, self._resume)
        elif call.getTime() - self._reactor.seconds() < wait:  # more chunks of the same read
            call.reset(wait)
        if self._stall_call is not None:  # our own pause is no stall
            self._stall_call.reset(wait + self._rules.stall_timeout)

    def _resume(self) -> None:
        self._resume_call = None
        if self._finished.called:
            return
        if self._stall_call is not None:  # silence counts from now
            self._stall_call.reset(self._rules.stall_timeout)
        assert self.transport is not None
        self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone):
            self._end()
        elif reason.check(PotentialDataLoss):  # no length: a reset looks the same as the end
            self._end(unverified=True)
        elif not self._rules.fail_on_dataloss:
            self._end(dataloss=True)
        else:
            self.fail(ConnectionLost(
                f"connection lost after {self._received} body bytes: {_reason(reason)}"))

    def fail(self, exc: Exception) -> None:
        """End the transfer now with *exc* (stall, size cap, disk error)."""
        if self._cancel_timers():
            self._finished.errback(exc)
            self.stop()

    def _end(self, *, unverified: bool = False, dataloss: bool = False, stopped: StopDownload | None = None) -> None:
        if self._cancel_timers():
            self._finished.callback(_Ended(bytes(self._buffer), unverified, dataloss, stopped))

    def _cancel_timers(self) -> bool:
        """Stop watching for stalls and drop a pending resume; False when the transfer
        had ended already."""
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.cancel()
        if self._resume_call is not None:
            if self._resume_call.active():
                self._resume_call.cancel()
            self._resume_call = None
        return not self._finished.called

    def stop(self) -> None:
        """Stop receiving: the transfer is over (ended, failed or cancelled)."""
        self._cancel_timers()
        if self.transport is not None:
            self.transport.stopProducing()

    def _stalled(self) -> None:
        self.fail(StallTimeoutError(
            f"no data for {self._rules.stall_timeout:g} s after {self._received} body bytes "
            "(FETCHER_STALL_TIMEOUT)"
        ))


def _respond(request: Request, url: str, status: int, headers: Headers, body: bytes, flags: list[str],
             txresponse: TxResponse, stopped: StopDownload | None) -> Response:
    """The Response, or StopDownload(fail=True) carrying it, as stock ``make_response`` does."""
    if stopped is not None:
        flags.append(STOPPED_FLAG)
    response = Response(url=url, status=status, headers=headers, body=body, flags=flags, request=request,
                        protocol="HTTP/{}.{}".format(*txresponse.version[1:]))
    if stopped is not None and stopped.fail:
        stopped.response = response
        raise stopped
    return response


def _split_credentials(url: str) -> tuple[str, bytes | None]:
    """*url* without its user:password, and the Basic ``Authorization`` value they make
    (sent instead: a userinfo on the wire would reach the Host header and the proxy)."""
    netloc = urlsplit(url).netloc
    userinfo, at, _ = netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode())
    return url.replace(userinfo + "@", "", 1), b"Basic " + token


def _bind_address(value: str | tuple[str, int] | list[Any] | None) -> tuple[str, int] | None:
    """meta ``bindaddress``/DOWNLOAD_BIND_ADDRESS as stock takes it: a host, or (host, port)."""
    if not value:
        return None
    if isinstance(value, str):
        return value, 0
    host, port = value
    return str(host), int(port)


def _warn_size(request: Request, size: int, warnsize: int, *, expected: bool) -> None:
    logger.warning("%s %d bytes of %s, over download_warnsize (%d)",
                   "Expecting" if expected else "Received", size, safe_url(request.url), warnsize)


def _fitting_concurrency(wanted: int) -> int:
    """Transfers that fit in the file-descriptor limit (``ulimit -n``): each
    needs a socket and a .part file, and Scrapy needs some for itself. The soft
    limit is raised to the hard one first; past that, fewer transfers run at once
    rather than failing on EMFILE."""
    wanted = max(1, wanted)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * wanted + _RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < needed:
        with contextlib.suppress(ValueError, OSError):
            soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    fitting = max(1, (soft - _RESERVED_FDS) // 2)
    logger.warning("CONCURRENT_REQUESTS=%d needs about %d file descriptors, but the limit (ulimit -n) is %d: "
                   "running %d transfers at once", wanted, needed, soft, fitting)
    return fitting


def _reason(failure: Failure) -> str:
    return _describe(failure.value)


def _describe(exc: BaseException) -> str:
    """Twisted wraps the real causes (TLS errors, resets) in ``reasons``."""
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return "; ".join(_describe(r.value) for r in reasons)
    return str(exc) or type(exc).__name__


def _is_verification_failure(exc: BaseException) -> bool:
    """A certificate that does not verify, as opposed to a handshake cut short (worth a retry)."""
    text = str(exc).lower()
    return type(exc).__name__ == "VerificationError" or (
        isinstance(exc, SSL.Error) and "certificate" in text and "verify" in text
    )


def _readable(exc: Exception, request: Request) -> Exception:
    """Scrapy's public download exceptions, with a message fit for the manifest."""
    # host[:port] only: a URL's user:password must not reach messages, records or failed.txt.
    host = peer = host_of(request.url)
    if proxy := request.meta.get("proxy"):  # the connection is to the proxy
        peer = f"proxy {host_of(add_http_if_no_scheme(proxy))}"
        host = f"{host} through {peer}"
    if isinstance(exc, txerror.DNSLookupError):
        return DNSLookupFailed(f"DNS lookup failed for {peer}")
    if isinstance(exc, txerror.ConnectionRefusedError):
        return ConnectionRefused(f"connection refused by {peer}")
    if isinstance(exc, txerror.TimeoutError):
        return Timeout(f"connecting to {peer} timed out")
    reasons = getattr(exc, "reasons", None) or []  # ResponseFailed, ResponseNeverReceived
    described = _describe(exc)
    if any(_is_verification_failure(r.value) for r in reasons):
        return TLSError(f"TLS with {host} failed: {described} (DOWNLOAD_VERIFY_CERTIFICATES=False skips the check)")
    if reasons:
        return ConnectionFailed(f"connection to {host} failed: {described}")
    if isinstance(exc, txerror.ConnectError):
        return ConnectionFailed(f"cannot connect to {peer}: {exc}")
    return exc
