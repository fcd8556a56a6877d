"""Every private Scrapy name fetcher leans on, in one place.

Tested with Scrapy 2.18.0 and 2.19.0 (pyproject pins the range); tests/test_scrapy_private.py
fails loudly when an upgrade moves or changes one of these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scrapy.core.downloader.contextfactory import _load_context_factory_from_settings
from twisted.internet.defer import Deferred
from scrapy.core.downloader.handlers.http11 import (
    _BindAddressAgent,
    _LenientHTTP11ClientFactory,
    _ScrapyProxyAgent,
    _TunnelingAgent,
)

if TYPE_CHECKING:
    from scrapy.crawler import Crawler
    from twisted.internet.interfaces import IReactorTime
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.iweb import IPolicyForHTTPS


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
    engine = crawler.engine
    slot = engine._slot  # noqa: SLF001 - Scrapy has no public "is closing" for the spider
    # The slot's closing is a Deferred once closing began (Scrapy types it Deferred | None).
    return not engine.running or isinstance(getattr(slot, "closing", None), Deferred)


def lenient_parsing(pool: HTTPConnectionPool) -> None:
    """Parse responses on *pool*'s connections as stock HTTP11DownloadHandler does: a
    header line without a colon is skipped (browsers do the same) instead of failing
    the whole response. Stock sets the same private factory on its own pool."""
    pool._factory = _LenientHTTP11ClientFactory  # noqa: SLF001


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
