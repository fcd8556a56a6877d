"""Stock Scrapy FilesPipeline on a URL list: the peer that bench/peers.py measures fetcher against.

Run outside any Scrapy project (no scrapy.cfg in the working directory, no
SCRAPY_SETTINGS_MODULE), so that everything but what is said here is Scrapy's default:

    scrapy runspider bench/stock_spider.py -a list=urls.txt -s FILES_STORE=/dev/shm/stock \\
        -s CONCURRENT_REQUESTS=64 -s CONCURRENT_REQUESTS_PER_DOMAIN=64

The list is read as aria2c's input format, minimally: one URL a line; blank lines,
``#`` comments and indented option lines (`` out=...``) are skipped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import scrapy


def list_urls(path: str) -> list[str]:
    """The URLs of an aria2c-format list, read as minimally as said above (bench/floor_spider.py
    reads its list with this too)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line[0].isspace() and not line.startswith("#")]


class StockSpider(scrapy.Spider):
    name = "stock"
    list: str  # -a list=PATH
    custom_settings = {"ITEM_PIPELINES": {"scrapy.pipelines.files.FilesPipeline": 1}}  # noqa: RUF012 - Scrapy's API

    async def start(self) -> AsyncIterator[Any]:
        for url in list_urls(self.list):
            yield {"file_urls": [url]}
