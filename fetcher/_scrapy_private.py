"""Every private Scrapy name fetcher leans on, in one place.

Tested with Scrapy 2.19.0 (pyproject pins the range); tests/test_scrapy_private.py
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
    """Let a graceful stop (Ctrl-C) finish once the last item is done.

    Scrapy 2.19's scraper checks whether it may close only after processing a
    response, never after an item that came from ``start()``: a stop that begins
    while such items are in the pipelines waits for ever. Checking again is safe
    at any time (it fires only when the scraper is idle and closing)."""
    scraper = crawler.engine.scraper
    if scraper.slot is not None and scraper.slot.closing is not None:
        scraper._check_if_closing()  # noqa: SLF001
