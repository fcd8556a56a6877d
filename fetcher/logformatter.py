"""Scrapy's own log lines (crawled, scraped, dropped, errors) with URL credentials hidden.

A request to ``http://alice:s3cret@host/x`` is logged as ``<GET http://***@host/x>``:
the add-on sets LOG_FORMATTER to this class (a project's own formatter wins).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scrapy import logformatter

from fetcher.redact import safe_text

if TYPE_CHECKING:
    from scrapy.http import Request, Response

    _Entry = logformatter.LogFormatterResult


class LogFormatter(logformatter.LogFormatter):
    """Every entry's arguments pass through fetcher's one formatter (fetcher/redact.py)."""

    def crawled(self, request: Request, response: Response, spider: Any) -> _Entry:
        return _safe(super().crawled(request, response, spider), request, response)

    def scraped(self, item: Any, response: Response | Any, spider: Any) -> _Entry:
        return _safe(super().scraped(item, response, spider), response)

    def dropped(self, item: Any, exception: BaseException, response: Response | Any, spider: Any) -> _Entry:
        return _safe(super().dropped(item, exception, response, spider), response)

    def item_error(self, item: Any, exception: BaseException, response: Response | Any, spider: Any) -> _Entry:
        return _safe(super().item_error(item, exception, response, spider), response)

    def spider_error(self, failure: Any, request: Request, response: Response | Any, spider: Any) -> _Entry:
        return _safe(super().spider_error(failure, request, response, spider), request, response)

    def download_error(self, failure: Any, request: Request, spider: Any, errmsg: str | None = None) -> _Entry:
        return _safe(super().download_error(failure, request, spider, errmsg), request)


def _safe(entry: _Entry, *sources: Any) -> _Entry:
    """*entry* with the credentials of its request's or response's URLs hidden."""
    urls = [url for s in sources if "@" in (url := getattr(s, "url", "") or "")]
    if urls:
        entry["args"] = {k: safe_text(str(v), *urls) for k, v in entry["args"].items()}
    return entry
