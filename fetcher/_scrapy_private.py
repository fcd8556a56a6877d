"""Every private Scrapy name fetcher leans on, in one place.

Tested with Scrapy 2.18.0 and 2.19.0 (pyproject pins the range); tests/test_scrapy_private.py
fails loudly when an upgrade moves or changes one of these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scrapy.core.downloader.contextfactory import _load_context_factory_from_settings

if TYPE_CHECKING:
    from scrapy.crawler import Crawler
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
    return not engine.running or (slot is not None and slot.closing is not None)
