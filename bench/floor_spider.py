"""Scrapy's own request path and one write per file: the floor under any Scrapy-based downloader.

bench/peers.py runs it as the tool ``scrapy-floor``. It is what a downloader built on
Scrapy cannot do without: each URL goes through ``engine.download`` (the downloader's
slots, its middlewares and Scrapy's HTTP/1.1 handler), and its body is written to a file
in one call. No item, no pipeline, no hash, no record, no resume, no name checks. It
holds every body in memory, as Scrapy's handler does, so it is not for big files.

Run outside any Scrapy project, so that everything but what is said here is Scrapy's
default:

    scrapy runspider bench/floor_spider.py -a list=urls.txt -a out=/dev/shm/floor \\
        -s CONCURRENT_REQUESTS=64 -s CONCURRENT_REQUESTS_PER_DOMAIN=64

The list is read by bench/stock_spider.py's ``list_urls``. Files are named f0, f1, ... in the
list's order. A failed download is logged and leaves its file out: the bench's count of
files and bytes fails the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import scrapy

# Its neighbour in bench/: `scrapy runspider` imports this file with bench/ on sys.path.
from stock_spider import list_urls


class FloorSpider(scrapy.Spider):
    name = "floor"
    list: str  # -a list=PATH
    out: str  # -a out=FOLDER

    async def start(self) -> AsyncIterator[Any]:
        urls = list_urls(self.list)
        out = Path(self.out)
        # As many at once as the downloader takes: none waits in a slot's queue.
        room = asyncio.Semaphore(self.settings.getint("CONCURRENT_REQUESTS"))

        async def fetch(i: int, url: str) -> None:
            async with room:
                response = await self.crawler.engine.download_async(scrapy.Request(url, dont_filter=True))
            if response.status != 200:
                raise RuntimeError(f"{url}: HTTP {response.status}")
            (out / f"f{i}").write_bytes(response.body)

        for failed in await asyncio.gather(*(fetch(i, url) for i, url in enumerate(urls)), return_exceptions=True):
            if failed is not None:
                self.logger.error("download failed: %s", failed)
        return
        yield  # an async generator that yields nothing: start() is one
