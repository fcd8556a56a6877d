"""Download handler that streams response bodies into a sink instead of memory.

Every stock Scrapy HTTP handler buffers the whole body. A request whose
``meta["fetcher_sink"]`` holds a :class:`~fetcher.writer.HashingWriter` is
fetched here with Twisted's public Agent API and each chunk goes straight to
that writer; the Response handed back has an empty body. Every other request is
passed to the stock handler, so the handler can replace ``http``/``https`` in
any project's DOWNLOAD_HANDLERS.

Timeouts for streamed requests: DOWNLOAD_TIMEOUT (or meta ``download_timeout``)
bounds connecting plus waiting for the response headers; FETCHER_STALL_TIMEOUT
bounds every silence while the body flows; FETCHER_MAX_TIME, when set, bounds
the whole request. A large file that keeps flowing is never cut for being long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import weakref
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urldefrag

from OpenSSL import SSL
from scrapy.core.downloader.handlers.base import BaseDownloadHandler
from scrapy.core.downloader.handlers.http11 import HTTP11DownloadHandler
from scrapy.exceptions import (
    CannotResolveHostError,
    DownloadConnectionRefusedError,
    DownloadFailedError,
    DownloadTimeoutError,
    NotConfigured,
    NotSupported,
    ResponseDataLossError,
)
from scrapy.http import Headers, Response
from scrapy.utils.defer import maybe_deferred_to_future
from scrapy.utils.httpobj import urlparse_cached
from scrapy.utils.misc import build_from_crawler
from twisted.internet import error as txerror
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers as TxHeaders
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from fetcher.addon import DEFAULTS
from fetcher._scrapy_private import tls_policy
from fetcher.writer import BodyError

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings
    from scrapy.statscollectors import StatsCollector
    from twisted.internet.base import DelayedCall
    from twisted.python.failure import Failure
    from twisted.web.client import Response as TxResponse

    from fetcher.writer import HashingWriter

logger = logging.getLogger(__name__)

SINK_META = "fetcher_sink"
#: Flag on responses whose body went to the sink.
STREAMED_FLAG = "fetcher:streamed"
#: Flag on streamed responses that ended with the connection, with no length to check.
UNVERIFIED_END_FLAG = "fetcher:unverified-end"
_RESERVED_FDS = 64  # descriptors Scrapy, the reactor, logs and the manifest need besides transfers
#: How much of a body that is not streamed (an error page) is kept.
_ERROR_BODY_LIMIT = 64 * 1024


class StallTimeoutError(DownloadTimeoutError):
    """No body bytes arrived for FETCHER_STALL_TIMEOUT seconds."""


class ProxyNotSupported(NotSupported):
    """A streamed request that should go through a proxy: refused rather than sent around it."""


class TLSError(Exception):
    """The TLS handshake failed (a certificate that does not verify): retrying cannot help."""


class _TransferLimits:
    """The transfer limits of one crawl, shared by its http and https handlers.

    Scrapy enforces CONCURRENT_REQUESTS only for requests from its scheduler (the
    pipeline's do not come from there), and with the asyncio reactor its
    downloader starts every request queued in one loop iteration, whatever
    CONCURRENT_REQUESTS_PER_DOMAIN says. Streamed transfers are bounded here
    instead: first by host, so that one waiting behind its host holds no global
    slot, then in all."""

    _by_crawler: weakref.WeakKeyDictionary[Crawler, _TransferLimits] = weakref.WeakKeyDictionary()

    def __init__(self, settings: BaseSettings) -> None:
        self.total = asyncio.Semaphore(_fitting_concurrency(settings.getint("CONCURRENT_REQUESTS")))
        self._per_host = settings.getint("CONCURRENT_REQUESTS_PER_IP") or settings.getint(
            "CONCURRENT_REQUESTS_PER_DOMAIN")
        self._slot_settings = settings.getdict("DOWNLOAD_SLOTS")
        self._hosts: dict[str, asyncio.Semaphore] = {}

    @classmethod
    def of(cls, crawler: Crawler) -> _TransferLimits:
        if crawler not in cls._by_crawler:
            cls._by_crawler[crawler] = cls(crawler.settings)
        return cls._by_crawler[crawler]

    def host(self, request: Request) -> asyncio.Semaphore:
        """One semaphore per downloader slot (host), sized as Scrapy sizes the slot."""
        key = request.meta.get("download_slot") or urlparse_cached(request).hostname or ""
        if key not in self._hosts:
            size = self._slot_settings.get(key, {}).get("concurrency", self._per_host)
            self._hosts[key] = asyncio.Semaphore(max(1, int(size)))
        return self._hosts[key]


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
        self._timeout = settings.getfloat("DOWNLOAD_TIMEOUT")
        # Unset: DOWNLOAD_TIMEOUT, as wget's --timeout covers reads too.
        stall = settings.get("FETCHER_STALL_TIMEOUT", DEFAULTS["FETCHER_STALL_TIMEOUT"])
        self._stall_timeout = self._timeout if stall in (None, "") else float(stall)
        self._max_time = settings.getfloat("FETCHER_MAX_TIME", DEFAULTS["FETCHER_MAX_TIME"])
        self._limits = _TransferLimits.of(crawler)

    async def download_request(self, request: Request) -> Response:
        sink: HashingWriter | None = request.meta.get(SINK_META)
        if sink is None:
            return await self._fallback.download_request(request)
        stats = self.crawler.stats
        # The host's limit first: a request waiting behind its host holds no global slot.
        async with self._limits.host(request), self._limits.total:
            stats.inc_value("fetcher/active")
            try:
                return await self._stream(request, sink)
            except (BodyError, DownloadTimeoutError):
                raise
            except Exception as exc:
                raise _readable(exc, request) from exc
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

    async def _stream(self, request: Request, sink: HashingWriter) -> Response:
        if request.meta.get("proxy"):
            raise ProxyNotSupported(
                "streamed downloads do not go through proxies yet (meta 'proxy', e.g. from http_proxy); "
                "unset the proxy for these hosts (no_proxy) or disable HttpProxyMiddleware"
            )
        timeout = float(request.meta.get("download_timeout") or self._timeout)
        agent = Agent(self._reactor, contextFactory=self._tls, connectTimeout=timeout, pool=self._pool)
        url = urldefrag(request.url)[0]
        # Proxy-* headers are for a proxy; this handler connects directly (see download_request).
        headers_out = TxHeaders({k: v for k, v in request.headers.items() if not k.lower().startswith(b"proxy-")})
        d: Deferred[IResponse] = agent.request(request.method.encode(), url.encode("ascii"), headers_out, None)
        headers_call = self._reactor.callLater(timeout, d.cancel)
        try:
            txresponse = cast("TxResponse", await maybe_deferred_to_future(d))
        except Exception as exc:
            if not headers_call.active():  # our cancel fired: Twisted wraps it in various ways
                raise DownloadTimeoutError(f"no response within {timeout:g} s (DOWNLOAD_TIMEOUT)") from exc
            raise
        finally:
            if headers_call.active():
                headers_call.cancel()
        headers = Headers()
        if txresponse.length != UNKNOWN_LENGTH:
            headers[b"Content-Length"] = str(txresponse.length).encode()
        headers.update(txresponse.headers.getAllRawHeaders())
        status = int(txresponse.code)
        has_body = request.method != "HEAD" and txresponse.length != 0 and status not in (204, 304)
        try:
            streaming = request.method != "HEAD" and sink.begin(status, headers)
        except BaseException:
            if has_body:  # nobody will read this body: close the connection instead of leaking it
                txresponse.deliverBody(_Discard())
            raise
        body, flags = b"", [STREAMED_FLAG] if streaming else []
        if has_body:
            # Cancelled (the engine closing): stop the transfer rather than leave it draining.
            finished: Deferred[tuple[bytes, bool]] = Deferred(lambda _: reader.stop())
            reader = _BodyReader(finished, sink if streaming else None, self._reactor, self._stall_timeout,
                                 self.crawler.stats)
            txresponse.deliverBody(reader)
            max_call = (
                self._reactor.callLater(self._max_time, reader.fail, DownloadTimeoutError(
                    f"download took longer than {self._max_time:g} s (FETCHER_MAX_TIME)"))
                if self._max_time else None
            )
            try:
                body, unverified_end = await maybe_deferred_to_future(finished)
            finally:
                if max_call is not None and max_call.active():
                    max_call.cancel()
            # Checkable only where the server takes ranges; a 206 told the full length already.
            accepts_ranges = b"bytes" in (headers.get(b"Accept-Ranges") or b"").lower()
            if unverified_end and streaming and sink.expected_size is None and accepts_ranges:
                flags.append(UNVERIFIED_END_FLAG)
        if streaming:
            sink.finish()
            # The bytes on disk are the ones sent; no middleware may decode an empty body.
            headers.pop(b"Content-Encoding", None)
        return Response(
            url=url,
            status=status,
            headers=headers,
            body=body,
            flags=flags,
            request=request,
            protocol="HTTP/{}.{}".format(*txresponse.version[1:]),
        )


class _Discard(Protocol):
    """Closes a response body nobody wants, so its connection is not left open."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()


class _BodyReader(Protocol):
    """Feeds body chunks to the sink (or keeps a bounded error body) and watches for stalls.

    Fires *finished* with the kept error body (empty when streamed) and whether
    the end was only a closed connection (no length to check it against)."""

    def __init__(
        self,
        finished: Deferred[tuple[bytes, bool]],
        sink: HashingWriter | None,
        reactor: Any,
        stall_timeout: float,
        stats: StatsCollector,
    ) -> None:
        self._finished = finished
        self._stats = stats  # fetcher/bytes_received moves as bytes arrive: the progress display reads it
        self._sink = sink
        self._buffer = bytearray()
        self._received = 0
        self._stall_timeout = stall_timeout
        self._stall_call: DelayedCall | None = (
            reactor.callLater(stall_timeout, self._stalled) if stall_timeout else None
        )

    def dataReceived(self, data: bytes) -> None:
        if self._finished.called:
            return
        self._received += len(data)
        if self._stall_call is not None:
            self._stall_call.reset(self._stall_timeout)
        if self._sink is None:  # an error page: keep its start, stop reading the rest
            self._buffer += data[: _ERROR_BODY_LIMIT - len(self._buffer)]
            if len(self._buffer) >= _ERROR_BODY_LIMIT:
                self._end(bytes(self._buffer), unverified=False)
                self.stop()
            return
        try:
            self._sink.write(data)
        except Exception as exc:  # disk full, size cap: stop the transfer, report why
            self.fail(exc)
            return
        self._stats.inc_value("fetcher/bytes_received", len(data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone):
            self._end(bytes(self._buffer), unverified=False)
        elif reason.check(PotentialDataLoss):  # no length: a reset looks the same as the end
            self._end(bytes(self._buffer), unverified=True)
        else:
            self.fail(ResponseDataLossError(
                f"connection lost after {self._received} body bytes: {_reason(reason)}"))

    def fail(self, exc: Exception) -> None:
        """End the transfer now with *exc* (stall, size cap, disk error)."""
        if self._cancel_stall_timer():
            self._finished.errback(exc)
            self.stop()

    def _end(self, body: bytes, *, unverified: bool) -> None:
        if self._cancel_stall_timer():
            self._finished.callback((body, unverified))

    def _cancel_stall_timer(self) -> bool:
        """Stop watching for stalls; False when the transfer had ended already."""
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.cancel()
        return not self._finished.called

    def stop(self) -> None:
        """Stop receiving: the transfer is over (ended, failed or cancelled)."""
        self._cancel_stall_timer()
        if self.transport is not None:
            self.transport.stopProducing()

    def _stalled(self) -> None:
        self.fail(StallTimeoutError(
            f"no data for {self._stall_timeout:g} s after {self._received} body bytes "
            "(FETCHER_STALL_TIMEOUT)"
        ))


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
    host = urlparse_cached(request).netloc.rpartition("@")[2] or request.url
    if isinstance(exc, txerror.DNSLookupError):
        return CannotResolveHostError(f"DNS lookup failed for {host}")
    if isinstance(exc, txerror.ConnectionRefusedError):
        return DownloadConnectionRefusedError(f"connection refused by {host}")
    if isinstance(exc, txerror.TimeoutError):
        return DownloadTimeoutError(f"connecting to {host} timed out")
    reasons = getattr(exc, "reasons", None) or []  # ResponseFailed, ResponseNeverReceived
    described = _describe(exc)
    if any(_is_verification_failure(r.value) for r in reasons):
        return TLSError(f"TLS with {host} failed: {described} (DOWNLOAD_VERIFY_CERTIFICATES=False skips the check)")
    if reasons:
        return DownloadFailedError(f"connection to {host} failed: {described}")
    if isinstance(exc, txerror.ConnectError):
        return DownloadFailedError(f"cannot connect to {host}: {exc}")
    return exc
