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


class StockSpider(scrapy.Spider):
    name = "stock"
    list: str  # -a list=PATH
    custom_settings = {"ITEM_PIPELINES": {"scrapy.pipelines.files.FilesPipeline": 1}}  # noqa: RUF012 - Scrapy's API

    async def start(self) -> AsyncIterator[Any]:
        with open(self.list, encoding="utf-8") as f:  # noqa: ASYNC230 - a local file, as minimal as it gets
            for line in f:
                if line.strip() and not line[0].isspace() and not line.startswith("#"):
                    yield {"file_urls": [line.strip()]}
