"""``scrapy crawl`` that exits non-zero when a download failed.

Stock ``scrapy crawl`` exits 0 even when every download failed; a script or CI
job running fetcher needs to know. Exit status: 0 when the run finished and no
URL failed, 1 otherwise (failures, a bad list, an interrupted run).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from scrapy.commands.crawl import Command as ScrapyCrawlCommand
from scrapy.exceptions import UsageError

if TYPE_CHECKING:
    import argparse


class _StartupChatter(logging.Filter):
    """Drops the start-up lists (enabled components, overridden settings) that
    bury what matters at the default level; LOG_LEVEL=DEBUG shows them again."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not str(record.msg).startswith(("Enabled ", "Overridden settings"))


class Command(ScrapyCrawlCommand):
    def run(self, args: list[str], opts: argparse.Namespace) -> None:
        if len(args) != 1:
            raise UsageError("give exactly one spider name, e.g. scrapy crawl fetch -a list=urls.txt")
        assert self.crawler_process and self.settings is not None
        if logging.getLevelName(self.settings.get("LOG_LEVEL")) >= logging.INFO:
            for name in ("scrapy.middleware", "scrapy.addons", "scrapy.crawler"):
                logging.getLogger(name).addFilter(_StartupChatter())
        crawler = self._create_crawler(args[0])
        # Bad arguments (a missing list file) are a usage error, not a traceback.
        check = getattr(crawler.spidercls, "check_arguments", None)
        if check is not None:
            try:
                check(**opts.spargs)
            except ValueError as exc:
                raise UsageError(str(exc), print_help=False) from exc
        self.crawler_process.crawl(crawler, **opts.spargs)
        self.crawler_process.start()
        if self.crawler_process.bootstrap_failed:
            self.exitcode = 1
            return
        stats = crawler.stats
        if stats.get_value("finish_reason") != "finished" or stats.get_value("fetcher/failed", 0):
            self.exitcode = 1
