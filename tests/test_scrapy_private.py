"""Guards for the Scrapy internals fetcher leans on (fetcher/_scrapy_private.py).

If one of these fails after a Scrapy upgrade, the upgrade moved or changed an
internal: fix _scrapy_private.py before widening the pinned range in pyproject.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

from scrapy.core import engine
from scrapy.utils.test import get_crawler
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import (
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    Request,
    ResponseFailed,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS

from fetcher import _scrapy_private, settings
from fetcher.exceptions import HeadersTooLarge


def test_tls_policy_is_built_from_scrapy_settings() -> None:
    verified = _scrapy_private.tls_policy(get_crawler(settings_dict={"DOWNLOAD_VERIFY_CERTIFICATES": True}))
    unverified = _scrapy_private.tls_policy(get_crawler(settings_dict={"DOWNLOAD_VERIFY_CERTIFICATES": False}))
    assert IPolicyForHTTPS.providedBy(verified) and IPolicyForHTTPS.providedBy(unverified)
    # What the setting does on the wire is checked end to end in test_faults.py (TLS tests).


def test_installed_scrapy_is_in_the_tested_range() -> None:
    major, minor = (int(x) for x in version("scrapy").split(".")[:2])
    assert (2, 18) <= (major, minor) <= (2, 19), "fetcher was tested with Scrapy 2.18-2.19: rerun, then widen the pin"


def test_scrapy_tls_modules_load_without_walking_the_stack() -> None:
    """Importing Scrapy's TLS modules through _scrapy_private (a fresh interpreter, as every
    crawl process starts) gives their deprecated aliases the module names Scrapy's own helper
    gives them, without its "Error detecting parent module" warning, restores the helper's
    inspect, and never builds inspect's map of every loaded module (that walk was 85 ms of
    each start)."""
    code = """
import inspect, json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fetcher._scrapy_private
from scrapy.core.downloader import contextfactory, tls
from scrapy.utils import deprecate
print(json.dumps({
    "names": [contextfactory.ScrapyClientContextFactory.__module__,
              contextfactory.AcceptableProtocolsContextFactory.__module__, tls.ScrapyClientTLSOptions.__module__],
    "warnings": [str(w.message) for w in caught if "parent module" in str(w.message)],
    "restored": deprecate.inspect is inspect,
    "walked": len(inspect.modulesbyfile),
}))
"""
    found = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                      cwd=Path(__file__).parent.parent).stdout)
    assert found == {"names": ["scrapy.core.downloader.contextfactory"] * 2 + ["scrapy.core.downloader.tls"],
                     "warnings": [], "restored": True, "walked": 0}


def test_fetcher_settings_module_keeps_scrapy_names() -> None:
    # Settings that Scrapy reads under these exact names; a rename upstream would silently drop them.
    from scrapy.settings import default_settings

    for name in ("DOWNLOAD_VERIFY_CERTIFICATES", "TELNETCONSOLE_ENABLED"):  # REMOTE_CONTROL_ENABLED: 2.19+
        assert hasattr(default_settings, name), name
        assert hasattr(settings, name), name


def test_stock_agents_for_proxies_and_bind_addresses() -> None:
    """Streamed requests reach proxies through http11's _TunnelingAgent, _ScrapyProxyAgent and
    _BindAddressAgent: what goes on the wire must stay what stock sends (on a memory reactor)."""
    reactor = MemoryReactorClock()
    pool = HTTPConnectionPool(reactor, persistent=False)
    tls = BrowserLikePolicyForHTTPS()
    bind = ("127.0.0.1", 0)

    def first_bytes(index: int) -> bytes:
        """Connect the index-th connection the agents opened, and return what it sent first."""
        factory = reactor.tcpClients[index][2]
        transport = StringTransport()
        factory.buildProtocol(None).makeConnection(transport)
        return transport.value()

    tunnel = _scrapy_private.tunneling_agent(reactor, tls, proxy=("127.0.0.9", 3128, b"Basic dTpw"),
                                             connect_timeout=5, bind_address=bind, pool=pool)
    tunnel.request(b"GET", b"https://127.0.0.2:8443/x")
    assert reactor.tcpClients[0][:2] == ("127.0.0.9", 3128) and reactor.tcpClients[0][4] == bind
    assert first_bytes(0) == (b"CONNECT 127.0.0.2:8443 HTTP/1.1\r\nHost: 127.0.0.2:8443\r\n"
                              b"Proxy-Authorization: Basic dTpw\r\n\r\n")

    proxy = _scrapy_private.proxy_agent(reactor, tls, proxy_uri=b"http://127.0.0.9:3128", connect_timeout=5,
                                        bind_address=bind, pool=pool)
    proxy.request(b"GET", b"http://127.0.0.2:8080/y")
    assert reactor.tcpClients[1][1] == 3128 and reactor.tcpClients[1][4] == bind
    assert first_bytes(1).startswith(b"GET http://127.0.0.2:8080/y HTTP/1.1\r\n")

    direct = _scrapy_private.direct_agent(reactor, tls, connect_timeout=5, bind_address=bind, pool=pool)
    direct.request(b"GET", b"http://127.0.0.2:8080/z")
    assert reactor.tcpClients[2][1] == 8080 and reactor.tcpClients[2][4] == bind
    assert first_bytes(2).startswith(b"GET /z HTTP/1.1\r\n")


def test_lenient_capped_parsing() -> None:
    """Streamed responses are parsed by subclasses of http11's _LenientHTTP11ClientFactory,
    _LenientHTTP11ClientProtocol and _LenientHTTPClientParser (and Twisted's _giveUp,
    _disconnectParser, _parser): a header line without a colon is skipped as stock does, and
    past FETCHER_MAX_HEADER_SIZE the connection is aborted and the response fails with
    HeadersTooLarge (on a memory transport)."""

    def respond(cap: int, *chunks: bytes) -> tuple[object, StringTransport]:
        """What the request's Deferred gave after *chunks* came in, and the transport."""
        protocol, transport, got = _requested(cap)
        for chunk in chunks:
            protocol.dataReceived(chunk)
        assert len(got) == 1, got
        return got[0], transport

    def too_large(result: object) -> HeadersTooLarge:
        assert isinstance(result, Failure) and isinstance(result.value, ResponseFailed), result
        [reason] = result.value.reasons
        assert isinstance(reason.value, HeadersTooLarge), reason
        return reason.value

    status = b"HTTP/1.1 200 OK\r\n"
    # Under the cap: the colon-less line is skipped, a line past Twisted's 16 KiB fits a 64 KiB cap.
    response, transport = respond(64 * 1024, status + b"X-A: 1\r\nNo colon here\r\nX-Long: " + b"a" * 20_000
                                  + b"\r\nContent-Length: 0\r\n\r\n")
    assert getattr(response, "code", None) == 200, response
    headers = response.headers  # type: ignore[attr-defined]
    assert headers.getRawHeaders(b"X-A") == [b"1"] and len(headers.getRawHeaders(b"X-Long")[0]) == 20_000
    assert not transport.disconnecting  # a persistent connection, kept for the next request

    # Over the cap in many lines, then in one line with no end yet: aborted, not closed cleanly.
    lines = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 90) for i in range(40))  # about 4 KiB
    for chunks in ([status, lines[:1000], lines[1000:]], [status + b"X-Big: " + b"a" * 3000]):
        result, transport = respond(2048, *chunks)
        assert str(too_large(result)) == "response headers over 2 KiB (FETCHER_MAX_HEADER_SIZE)"
        assert transport.disconnected, "aborted (abortConnection), so nothing more is read"
    over = too_large(respond(5000, status, lines, lines)[0])
    assert str(over) == "response headers over 5,000 bytes (FETCHER_MAX_HEADER_SIZE)"


def test_the_engine_says_when_closing_began() -> None:
    """spider_closing and closing_began read the engine's _slot and its closing Deferred (set
    once the spider's closing began, even before the engine ran: a Ctrl-C in the first second)."""
    assert "self._slot" in inspect.getsource(engine.ExecutionEngine.__init__)
    assert "self.closing = Deferred()" in inspect.getsource(engine._Slot)


def _requested(cap: int) -> tuple[Any, StringTransport, list[object]]:
    """A capped protocol on a memory transport, as the pool builds it, with a GET sent: the
    protocol, its transport, and what the request's Deferred gives (once it fires)."""
    pool = HTTPConnectionPool(MemoryReactorClock(), persistent=False)
    _scrapy_private.lenient_parsing(pool, max_header_size=cap)
    protocol = pool._factory(lambda *_: None, "test").buildProtocol(None)  # as the pool does
    transport = StringTransport()
    protocol.makeConnection(transport)
    got: list[object] = []
    request = Request(b"GET", b"/", Headers({b"Host": [b"origin"]}), None, persistent=True)
    protocol.request(request).addBoth(got.append)
    return protocol, transport, got


def _parse(parser_class: type | None, chunks: list[bytes]) -> tuple[object, ...]:
    """What a request on a memory transport ends with after *chunks* arrive: status, headers,
    body, how it ended and whether the connection closes; *parser_class* replaces the capped
    parser (None: fetcher's own)."""
    protocol, transport, got = _requested(1 << 20)
    if parser_class is not None:
        protocol._parser.__class__ = parser_class
    body: list[bytes] = []
    ended: list[str] = []

    class Collect(Protocol):
        def dataReceived(self, data: bytes) -> None:
            body.append(data)

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            ended.append(type(reason.value).__name__)

    delivered = False
    for chunk in chunks:
        protocol.dataReceived(chunk)
        if got and not delivered and not isinstance(got[0], Failure):
            got[0].deliverBody(Collect())  # type: ignore[attr-defined]
            delivered = True
    if not got:
        return ("pending",)
    response = got[0]
    if isinstance(response, Failure):
        return ("failed", type(response.value).__name__)
    headers = sorted((k, tuple(v)) for k, v in response.headers.getAllRawHeaders())  # type: ignore[attr-defined]
    return (response.code, headers, b"".join(body), ended, transport.disconnecting)  # type: ignore[attr-defined]


def test_header_lines_are_parsed_without_copying_the_body() -> None:
    """The capped parser hands Twisted's LineReceiver the status line and headers apart from
    what follows them (_after_head): however the bytes are cut into reads (one ending just before
    the blank line, say, with blank lines in the body), every response ends as under Scrapy's
    lenient parser (headers, body, how the body ended, whether the connection is kept), and no
    header line is parsed with the body's bytes in LineReceiver's buffer."""
    body = (bytes(range(256)) + b"\n\n\r\n\r\n\n\r\n") * 60  # blank lines in the body: not the head's end
    responses = {
        "length": b"HTTP/1.1 200 OK\r\nX-A: 1\r\nNo colon here\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
        "newlines only": b"HTTP/1.1 200 OK\nX-A: 1\nContent-Length: %d\n\n%s" % (len(body), body),
        "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (100, body[:100], len(body) - 100, body[100:])),
        "100 continue first": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                               % (len(body), body)),
        "until close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body,
        "no body, then stray bytes": b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\nstray",
        "no headers": b"HTTP/1.1 200 OK\r\n\r\n" + body,
    }
    lenient = _scrapy_private._LenientHTTPClientParser
    for name, raw in responses.items():
        cuts = sorted({*range(120), *range(len(raw) - 40, len(raw) + 1), len(raw) // 2})
        for cut in cuts:
            for chunks in ([raw[:cut], raw[cut:]], [raw[:cut], raw[cut:cut + 7], raw[cut + 7:]]):
                ours, stock = _parse(None, chunks), _parse(lenient, chunks)
                assert ours == stock, (name, cut)
        assert ours[0] in (200, 204), (name, ours)

    seen: list[int] = []

    class Watched(_scrapy_private._CappedHTTPClientParser):
        def lineReceived(self, line: bytes) -> None:
            seen.append(len(self._buffer))  # what LineReceiver holds, and copies at every line
            super().lineReceived(line)

    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(10))
    big = bytes(1 << 20)
    code, _, got, _, kept_open = _parse(Watched, [head + b"Content-Length: %d\r\n\r\n" % len(big) + big])
    assert (code, got, kept_open) == (200, big, False)
    assert len(seen) == 13 and max(seen) < 1024, seen
