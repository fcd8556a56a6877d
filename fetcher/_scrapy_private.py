"""Every private Scrapy name fetcher leans on, in one place (and the private Twisted ones that
Scrapy's lenient HTTP client builds on: HTTP11ClientProtocol's _parser, _giveUp, _disconnectParser;
and Response._transport, to read a big body in bigger pieces); also how Scrapy's
``create_deprecated_class`` names a module (``inspect.stack()[1]``), to import its TLS modules
without walking the stack.

Tested with Scrapy 2.18.0 and 2.19.0 (pyproject pins the range); tests/test_scrapy_private.py
fails loudly when an upgrade moves or changes one of these.
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from scrapy.utils import deprecate
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred

from fetcher.exceptions import HeadersTooLarge

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from scrapy.crawler import Crawler
    from twisted.internet.interfaces import IAddress, IReactorTime
    from twisted.python.failure import Failure
    from twisted.web._newclient import Request as TxRequest
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.iweb import IPolicyForHTTPS, IResponse


@contextmanager
def _quick_deprecated_aliases() -> Iterator[None]:
    """Scrapy's TLS modules define three deprecated aliases on import, and for each
    ``create_deprecated_class`` calls ``inspect.stack()`` only to name the module defining it:
    reading every frame's source and the first ``inspect.getmodule`` pass over all loaded
    modules cost about 85 ms of every process's start (of 0.6 s for an empty list). While
    they are imported, that helper's ``inspect`` is a copy whose ``stack`` gives just the
    caller's module, which ``inspect.getmodule`` returns as is: the same names, no walk."""
    real = deprecate.inspect
    quick = types.ModuleType(real.__name__)
    quick.__dict__.update(real.__dict__)
    quick.stack = _defining_module  # type: ignore[attr-defined]
    deprecate.inspect = quick  # type: ignore[attr-defined]
    try:
        yield
    finally:
        deprecate.inspect = real  # type: ignore[attr-defined]


def _defining_module(context: int = 1) -> list[Any]:
    """``inspect.stack()`` as ``create_deprecated_class`` reads it: entry 1 starts with what
    ``inspect.getmodule`` maps to the module that called it (the module itself)."""
    caller = sys._getframe(2)
    return [None, (sys.modules.get(caller.f_globals.get("__name__", ""), caller),)]


with _quick_deprecated_aliases():
    from scrapy.core.downloader.contextfactory import (
        _load_context_factory_from_settings,
    )
    from scrapy.core.downloader.handlers.http11 import (
        _BindAddressAgent,
        _LenientHTTP11ClientFactory,
        _LenientHTTP11ClientProtocol,
        _LenientHTTPClientParser,
        _ScrapyProxyAgent,
        _TunnelingAgent,
    )


def tls_policy(crawler: Crawler) -> IPolicyForHTTPS:
    """The TLS policy stock handlers use, built from the same settings
    (DOWNLOADER_CLIENTCONTEXTFACTORY, DOWNLOAD_VERIFY_CERTIFICATES, TLS versions and
    ciphers), so streamed downloads verify certificates exactly like the rest."""
    return _load_context_factory_from_settings(crawler)


def recheck_scraper_closing(crawler: Crawler) -> None:
    """Let a closing spider (Ctrl-C, CLOSESPIDER_*) finish once the last item is done.

    Scrapy 2.19's scraper checks whether it may close only after processing a
    response, never after an item that came from ``start()``: a close that begins
    while such items are in the pipelines waits for ever. Checking again is safe
    at any time (it fires only when the scraper is idle and closing)."""
    slot = crawler.engine.scraper.slot
    if slot is not None and slot.closing is not None and not slot.closing.called:
        crawler.engine.scraper._check_if_closing()  # noqa: SLF001


def spider_closing(crawler: Crawler) -> bool:
    """Whether the run is ending (stopped, or its spider closing for any reason):
    time to start no new transfer and to cut backoffs short."""
    return not crawler.engine.running or closing_began(crawler)


def closing_began(crawler: Crawler) -> bool:
    """Whether the spider's closing began (the engine may not have been running yet: a Ctrl-C
    just after the spider opened)."""
    slot = crawler.engine._slot  # noqa: SLF001 - Scrapy has no public "is closing" for the spider
    # The slot's closing is a Deferred once closing began (Scrapy types it Deferred | None).
    return isinstance(getattr(slot, "closing", None), Deferred)


def read_in_pieces(txresponse: IResponse, size: int) -> None:
    """Have the connection *txresponse* arrives on read its socket up to *size* bytes at a time
    (Twisted reads 64 KiB, ``FileDescriptor.bufferSize``; under TLS, the TCP connection below
    it reads). Private: Twisted's ``Response._transport``, a TransportProxyProducer, and its
    ``_producer``, the connection (or the TLS protocol over it)."""
    proxy = getattr(txresponse, "_transport", None)
    connection = getattr(proxy, "_producer", None)
    connection = getattr(connection, "transport", connection)  # TLS wraps the TCP connection
    if isinstance(connection, FileDescriptor):
        connection.bufferSize = size


def lenient_parsing(pool: HTTPConnectionPool, *, max_header_size: int) -> None:
    """Parse responses on *pool*'s connections as stock HTTP11DownloadHandler does: a
    header line without a colon is skipped (browsers do the same) instead of failing
    the whole response. Stock sets Scrapy's lenient factory on its own pool; this one
    builds on it and also caps a response's status line and headers at *max_header_size*
    bytes: past it the connection is aborted at once (nothing more is read or kept) and
    the request fails with HeadersTooLarge, found in the ResponseFailed's ``reasons``."""
    pool._factory = partial(_CappedHTTP11ClientFactory, max_header_size=max_header_size)  # noqa: SLF001


def _end_of_head(data: bytes) -> int:
    """Where the status line and headers in *data* end (just past the blank line that ends them),
    or -1 when that blank line has not come yet. *data* starts at the start of a line (what
    LineReceiver keeps is never part of a line it parsed); lines end in "\n", as the parser
    splits them, and a "\r" before it is dropped."""
    for blank in (b"\n", b"\r\n"):
        if data.startswith(blank):
            return len(blank)
    crlf = data.find(b"\n\r\n")
    # A bare "\n\n" counts only before the first "\r\n" blank line: not searched for in the body.
    lf = data.find(b"\n\n", 0, len(data) if crlf == -1 else crlf + 2)
    if lf != -1:
        return lf + 2
    return -1 if crlf == -1 else crlf + 3


class _CappedHTTPClientParser(_LenientHTTPClientParser):
    """Scrapy's lenient parser, counting the bytes of the lines it is given (status line and
    headers; the body comes in raw mode). Raising out of dataReceived is how Twisted's own
    parse errors leave: HTTP11ClientProtocol.dataReceived hands the failure to _giveUp.

    It also keeps the body's first bytes out of Twisted's LineReceiver while the header lines
    are parsed: LineReceiver splits its whole buffer at every line, copying all that follows
    the line, so a 1 MiB read holding ten header lines and the body's start copied 10 MiB.
    What follows the head waits in ``_after_head`` and becomes LineReceiver's buffer again when
    its blank line is parsed, so whatever that line starts (the body, a 100 Continue's
    response, the end of a body-less response) finds LineReceiver exactly as Twisted left it."""

    max_header_size: int
    header_bytes: int
    _after_head: bytes = b""

    def dataReceived(self, data: bytes) -> None:
        if self._after_head:  # not expected (the head's blank line takes it back): keep the order
            self._buffer, self._after_head = self._buffer + self._after_head, b""
        if self.line_mode and not self._busyReceiving:
            whole = self._buffer + data
            end = _end_of_head(whole)
            if 0 < end < len(whole):
                self._buffer, data, self._after_head = b"", whole[:end], whole[end:]
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        self.header_bytes += len(line) + 1  # and the "\n" LineReceiver split it at
        if self.header_bytes > self.max_header_size:
            raise HeadersTooLarge.over(self.max_header_size)
        if self._after_head and not self._buffer:  # the head's blank line: what followed it is back
            self._buffer, self._after_head = self._after_head, b""
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        # One line over MAX_LENGTH (the cap: see _CappedHTTP11ClientProtocol.request). Twisted
        # would close the connection, a "connection failed" that is retried for nothing.
        raise HeadersTooLarge.over(self.max_header_size)


class _CappedHTTP11ClientProtocol(_LenientHTTP11ClientProtocol):
    """Scrapy's lenient protocol with its parser capped; a response over the cap aborts the
    connection rather than closing it cleanly (under TLS a clean close goes on reading)."""

    def __init__(self, quiescentCallback: Callable[..., Any], max_header_size: int) -> None:
        super().__init__(quiescentCallback)  # type: ignore[no-untyped-call]
        self._max_header_size = max_header_size

    def request(self, request: TxRequest) -> Deferred[IResponse]:
        d = super().request(request)
        # Scrapy swapped the parser's class for its lenient one (no state of its own); swap it
        # again for the capped subclass, whose state is set here, before any byte can arrive.
        parser = self._parser
        assert parser is not None
        parser.__class__ = _CappedHTTPClientParser
        parser.max_header_size = self._max_header_size
        parser.header_bytes = 0
        # LineReceiver keeps at most this much of one line (Twisted's 16 KiB would fail longer
        # lines that fit the cap; a line longer than the cap calls lineLengthExceeded).
        parser.MAX_LENGTH = self._max_header_size
        return d

    def _giveUp(self, reason: Failure) -> None:
        if reason.check(HeadersTooLarge):  # as Twisted's own cancel: abort, then fail the response
            self.transport.abortConnection()
            self._disconnectParser(reason)
        else:
            super()._giveUp(reason)  # type: ignore[no-untyped-call]


class _CappedHTTP11ClientFactory(_LenientHTTP11ClientFactory):
    """Scrapy's lenient factory, building capped protocols; one cap per pool."""

    def __init__(self, quiescentCallback: Callable[..., Any], metadata: object, *,
                 max_header_size: int) -> None:
        super().__init__(quiescentCallback, metadata)  # type: ignore[no-untyped-call]
        self._max_header_size = max_header_size

    def buildProtocol(self, addr: IAddress | None) -> _CappedHTTP11ClientProtocol:
        return _CappedHTTP11ClientProtocol(self._quiescentCallback, self._max_header_size)


# -- Twisted Agents for the three ways stock HTTP11DownloadHandler connects (its ScrapyAgent._get_agent).
# Scrapy's own classes, so that streamed downloads reach proxies exactly as the rest: the pool key
# carries the bind address (and, for tunnels, the proxy and its credentials), and a CONNECT tunnel
# sends Proxy-Authorization to the proxy only.


def direct_agent(reactor: IReactorTime, tls: IPolicyForHTTPS, *, connect_timeout: float,
                 bind_address: tuple[str, int] | None, pool: HTTPConnectionPool) -> Agent:
    """Straight to the origin, from *bind_address* if set."""
    return _BindAddressAgent(reactor, tls, connect_timeout, bind_address, pool)


def proxy_agent(reactor: IReactorTime, tls: IPolicyForHTTPS, *, proxy_uri: bytes, connect_timeout: float,
                bind_address: tuple[str, int] | None, pool: HTTPConnectionPool) -> Agent:
    """http:// URLs through a proxy: the absolute URI in the request line, the request's own
    headers (Proxy-Authorization included) to the proxy."""
    return _ScrapyProxyAgent(reactor, proxy_uri, tls, connect_timeout, bind_address, pool)


def tunneling_agent(reactor: IReactorTime, tls: IPolicyForHTTPS, *, proxy: tuple[str, int, bytes | None],
                    connect_timeout: float, bind_address: tuple[str, int] | None,
                    pool: HTTPConnectionPool) -> Agent:
    """https:// URLs through a CONNECT tunnel; *proxy* is (host, port, Proxy-Authorization value),
    the header goes in the CONNECT only (the caller removes it from the request itself)."""
    return _TunnelingAgent(reactor=reactor, proxyConf=proxy, contextFactory=tls, connectTimeout=connect_timeout,
                           bindAddress=bind_address, pool=pool)
