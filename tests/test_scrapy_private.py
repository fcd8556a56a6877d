"""Guards for the Scrapy internals fetcher leans on (fetcher/_scrapy_private.py).

If one of these fails after a Scrapy upgrade, the upgrade moved or changed an
internal: fix _scrapy_private.py before widening the pinned range in pyproject.
"""

from __future__ import annotations

from importlib.metadata import version

from scrapy.utils.test import get_crawler
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.client import BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS

from fetcher import _scrapy_private, settings


def test_tls_policy_is_built_from_scrapy_settings() -> None:
    verified = _scrapy_private.tls_policy(get_crawler(settings_dict={"DOWNLOAD_VERIFY_CERTIFICATES": True}))
    unverified = _scrapy_private.tls_policy(get_crawler(settings_dict={"DOWNLOAD_VERIFY_CERTIFICATES": False}))
    assert IPolicyForHTTPS.providedBy(verified) and IPolicyForHTTPS.providedBy(unverified)
    # What the setting does on the wire is checked end to end in test_faults.py (TLS tests).


def test_installed_scrapy_is_in_the_tested_range() -> None:
    major, minor = (int(x) for x in version("scrapy").split(".")[:2])
    assert (2, 18) <= (major, minor) <= (2, 19), "fetcher was tested with Scrapy 2.18-2.19: rerun, then widen the pin"


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
