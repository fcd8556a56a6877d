"""Download handler that streams response bodies into a sink instead of memory.

Every stock Scrapy HTTP handler buffers the whole body. A request whose
``meta["fetcher_sink"]`` holds a :class:`~fetcher.store.writer.Sink` (the pipeline's
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
FETCHER_MAX_HEADER_SIZE bounds the response headers' size: past it the connection
is aborted, nothing more is read or kept, and the file fails (HeadersTooLarge, not retried).

Bandwidth caps for streamed bodies: FETCHER_MAX_RATE (all transfers of the crawl,
as aria2's --max-overall-download-limit and wget's --limit-rate) and
FETCHER_MAX_RATE_PER_HOST (each downloader slot, keyed as Scrapy keys it), in bytes
a second. Each chunk is charged to token buckets (fetcher.transfer.ratelimit); over a cap,
the transfer stops reading its socket until the debt is paid, so nothing waits in
memory and TCP slows the sender. A paused transfer is not a stalled one. Unset, no
bucket exists and a chunk costs one test. Requests that are not streamed (handed
to the stock handler) are not counted.
"""

from __future__ import annotations

import base64
import logging
from time import monotonic
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urldefrag, urlparse, urlsplit

from OpenSSL import SSL
from scrapy import signals
from scrapy.core.downloader.handlers.base import BaseDownloadHandler
from scrapy.core.downloader.handlers.http11 import HTTP11DownloadHandler
from scrapy.exceptions import (
    DownloadTimeoutError,
    NotConfigured,
    NotSupported,
    StopDownload,
)
from scrapy.http import Headers, Response
from scrapy.utils.defer import maybe_deferred_to_future
from scrapy.utils.httpobj import urlparse_cached
from scrapy.utils.misc import build_from_crawler
from scrapy.utils.url import add_http_if_no_scheme
from twisted.internet import error as txerror
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers as TxHeaders
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from fetcher._scrapy_private import (
    direct_agent,
    lenient_parsing,
    proxy_agent,
    read_in_pieces,
    tls_policy,
    tunneling_agent,
)
from fetcher.config import Config
from fetcher.contract import (
    DATALOSS_FLAG,
    SINK_META,
    STOPPED_FLAG,
    STREAMED_FLAG,
    UNVERIFIED_END_FLAG,
)
from fetcher.exceptions import (
    ConnectionFailed,
    ConnectionRefused,
    DNSLookupFailed,
    HeadersTooLarge,
    Timeout,
    TLSError,
)
from fetcher.redact import host_of, safe_url
from fetcher.store.writer import BodyError, FileTooLarge
from fetcher.transfer.body import (
    BodyReader,
    BodyRules,
    Discard,
    Ended,
    describe,
    warn_size,
    when_done,
)
from fetcher.transfer.limits import TransferLimits

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.crawler import Crawler
    from scrapy.statscollectors import StatsCollector
    from twisted.web.client import Agent
    from twisted.web.client import Response as TxResponse

    from fetcher.contract import Sink
    from fetcher.transfer.ratelimit import TokenBucket

logger = logging.getLogger(__name__)

#: Agents kept for reuse (one per proxy, bind address and connect timeout); a bound, not a tuning knob.
_AGENTS_KEPT = 64
#: A body announced at this many bytes or more is read from its socket in pieces of up to _BIG_READ
#: (Twisted reads 64 KiB): a sixteenth of the reads, calls and hand-overs to the disk worker per
#: byte (200 x 4 MiB: 17% less CPU, 0.84x the time; 5,000 x 16 KiB read so: no change). Bodies
#: under a rate cap, which paces every read, are read as Twisted does.
_BIG_BODY = 1 << 20
_BIG_READ = 1 << 20


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
        config = Config.of(crawler)  # the transfer settings, checked once for the crawl
        # Header lines without a colon are skipped, as stock does; headers over the cap fail at once.
        lenient_parsing(self._pool, max_header_size=config.max_header_size)
        self._tls = tls_policy(crawler)
        self._agents: dict[tuple[Any, ...], Agent] = {}
        self._bind_address = settings.get("DOWNLOAD_BIND_ADDRESS")
        self._fail_on_dataloss = settings.getbool("DOWNLOAD_FAIL_ON_DATALOSS")
        self._timeout = settings.getfloat("DOWNLOAD_TIMEOUT")
        self._stall_timeout, self._max_time = config.stall_timeout, config.max_time
        self._limits = TransferLimits.of(crawler)

    async def download_request(self, request: Request) -> Response:
        sink: Sink | None = request.meta.get(SINK_META)
        if sink is None:
            return await self._fallback.download_request(request)
        engine = self.crawler.engine
        assert engine is not None  # requests reach handlers through the engine's downloader
        stats = self.crawler.stats
        assert stats is not None
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
        url = urldefrag(request.url)[0]
        txresponse = await self._request(request, url)
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
                txresponse.deliverBody(Discard())
            return respond(b"", [], stopped)
        rules = BodyRules(
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
                txresponse.deliverBody(Discard())
            raise
        if announced is not None and announced >= _BIG_BODY and buckets is None:
            read_in_pieces(txresponse, _BIG_READ)  # the connection keeps them for its next responses
        warned = announced is not None and bool(rules.warnsize) and announced > rules.warnsize
        if warned:
            warn_size(request, cast("int", announced), rules.warnsize, expected=True)
        ended = Ended()
        if has_body:
            reader = BodyReader(
                Deferred(lambda _: reader.stop()),  # cancelled (the engine closing): stop, do not drain
                sink if streaming else None, request, rules, warned=warned, reactor=self._reactor, stats=stats,
                send=lambda data: self._send(signals.bytes_received, request, data=data), buckets=buckets,
            )
            ended = await self._read(txresponse, reader)
            if streaming and ended.stopped is None:
                await self._settled(sink)
        if streaming:
            # The bytes on disk are the ones sent; no middleware may decode an empty body.
            headers.pop(b"Content-Encoding", None)
        if ended.stopped is not None:  # not finished: the sink holds only part of the body
            return respond(ended.body, [], ended.stopped)
        return respond(ended.body, _finish(sink if streaming else None, ended, headers))

    async def _request(self, request: Request, url: str) -> TxResponse:
        """Send *request* (to *url*, its credentials as Authorization) and wait for the
        response headers, within DOWNLOAD_TIMEOUT (or meta ``download_timeout``)."""
        timeout = float(request.meta.get("download_timeout") or self._timeout)
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
        request.meta["download_latency"] = monotonic() - started  # as stock: AutoThrottle reads it
        return txresponse

    async def _read(self, txresponse: TxResponse, reader: BodyReader) -> Ended:
        """Deliver the body to *reader* and wait for its end, within FETCHER_MAX_TIME when set."""
        txresponse.deliverBody(reader)
        max_call = self._reactor.callLater(self._max_time, reader.fail, Timeout(
            f"download took longer than {self._max_time:g} s (FETCHER_MAX_TIME)")) if self._max_time else None
        try:
            return await maybe_deferred_to_future(reader.finished)
        finally:
            if max_call is not None and max_call.active():
                max_call.cancel()

    async def _settled(self, sink: Sink) -> None:
        """Wait until a sink with a disk worker (``fetcher.contract.Paced``) has written the
        whole body, without holding the reactor: its ``finish`` then has nothing left to wait
        for (200 x 4 MiB: the reactor thread was blocked 0.2 s there)."""
        settle = getattr(sink, "settle", None)
        while settle is not None and (pending := settle()) is not None:
            await maybe_deferred_to_future(when_done(pending, self._reactor))

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


def _finish(sink: Sink | None, ended: Ended, headers: Headers) -> list[str]:
    """The response's flags for how its body ended; a streamed body's length checked by its sink."""
    if sink is None:
        return [DATALOSS_FLAG] if ended.dataloss else []
    flags = [STREAMED_FLAG, *([DATALOSS_FLAG] if ended.dataloss else [])]
    # Checkable only where the server takes ranges; a 206 told the full length already.
    accepts_ranges = b"bytes" in (headers.get(b"Accept-Ranges") or b"").lower()
    if ended.unverified and sink.expected_size is None and accepts_ranges:
        flags.append(UNVERIFIED_END_FLAG)
    sink.finish(accept_short=ended.dataloss)
    return flags


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
    for r in reasons:
        if isinstance(r.value, HeadersTooLarge):  # the parser's own (fetcher._scrapy_private)
            return r.value
    described = describe(exc)
    if any(_is_verification_failure(r.value) for r in reasons):
        return TLSError(f"TLS with {host} failed: {described} (DOWNLOAD_VERIFY_CERTIFICATES=False skips the check)")
    if reasons:
        return ConnectionFailed(f"connection to {host} failed: {described}")
    if isinstance(exc, txerror.ConnectError):
        return ConnectionFailed(f"cannot connect to {peer}: {exc}")
    return exc
