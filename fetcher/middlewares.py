"""Downloader middleware: redirect loops and chains that never end fail fast, with a reason."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urljoin

from scrapy.exceptions import IgnoreRequest

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.crawler import Crawler
    from scrapy.http import Response

_REDIRECTS = {301, 302, 303, 307, 308}


class RedirectLoopError(IgnoreRequest):
    """A redirect leads back to a URL of its own chain, or the chain is too long."""

    reason = "redirect loop"


class RedirectGuardMiddleware:
    """Sits just before Scrapy's RedirectMiddleware (which follows redirects up
    to REDIRECT_MAX_TIMES) and fails a redirect that returns to a URL already
    visited, at once, or one past REDIRECT_MAX_TIMES, with a readable error
    instead of a bare 3xx."""

    def __init__(self, max_times: int) -> None:
        self.max_times = max_times

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> RedirectGuardMiddleware:
        return cls(crawler.settings.getint("REDIRECT_MAX_TIMES"))

    def process_response(self, request: Request, response: Response) -> Response:
        location = response.headers.get("Location")
        if response.status not in _REDIRECTS or not location or request.meta.get("dont_redirect"):
            return response
        target = urljoin(request.url, location.decode("latin-1"))
        chain = [*request.meta.get("redirect_urls", []), request.url]
        if target in chain:
            raise RedirectLoopError("redirect loop: " + " -> ".join([*chain[chain.index(target):], target]))
        if len(chain) > self.max_times:
            raise RedirectLoopError(f"more than {self.max_times} redirects (REDIRECT_MAX_TIMES)")
        return response
