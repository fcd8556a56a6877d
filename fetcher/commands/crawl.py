"""``scrapy crawl`` that exits non-zero when a download failed.

Stock ``scrapy crawl`` exits 0 even when every download failed; a script or CI
job running fetcher needs to know. Exit status: 0 when the run finished and no
URL failed, 1 otherwise (failures, a bad list, an interrupted run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scrapy.commands.crawl import Command as ScrapyCrawlCommand
from scrapy.exceptions import UsageError

if TYPE_CHECKING:
    import argparse


class Command(ScrapyCrawlCommand):
    def run(self, args: list[str], opts: argparse.Namespace) -> None:
        if len(args) != 1:
            raise UsageError("give exactly one spider name, e.g. scrapy crawl fetch -a list=urls.txt")
        assert self.crawler_process
        crawler = self._create_crawler(args[0])
        self.crawler_process.crawl(crawler, **opts.spargs)
        self.crawler_process.start()
        stats = crawler.stats
        if (
            self.crawler_process.bootstrap_failed
            or stats is None
            or stats.get_value("finish_reason") != "finished"
            or stats.get_value("fetcher/failed", 0)
        ):
            self.exitcode = 1
