"""``scrapy crawl`` that exits non-zero when a download failed.

Stock ``scrapy crawl`` exits 0 even when every download failed; a script or CI
job running fetcher needs to know. Exit status: 0 when every URL of the run
ended well and the store's records were written (and, for the fetch spider, its
whole list was read; for other spiders, the run finished), 1 otherwise (failures,
a bad list, an interrupted run, a component that could not start, records that
could not be written). It counts the records as they are sent
(``fetcher.signals.file_finished``), not stats, so no extension setting can
turn failures into success.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import TYPE_CHECKING, Any

from scrapy import signals
from scrapy.commands.crawl import Command as ScrapyCrawlCommand
from scrapy.exceptions import UsageError

from fetcher import signals as fetcher_signals
from fetcher.exceptions import StartupError

if TYPE_CHECKING:
    import argparse

    from fetcher.items import FileRecord

logger = logging.getLogger(__name__)


#: Loggers with a DEBUG line for every file ("Crawled (200)", "Scraped from"): below LOG_LEVEL
#: they are not even made (two log records a file; 5,000 x 16 KiB in one process: 0.96x the time).
_PER_FILE_DEBUG = ("scrapy.core.engine", "scrapy.core.scraper")


class _StartupChatter(logging.Filter):
    """Drops the start-up lists (enabled components, overridden settings) that
    bury what matters at the default level; LOG_LEVEL=DEBUG shows them again."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not str(record.msg).startswith(("Enabled ", "Overridden settings"))


class _Outcome:
    """Whether every URL of the run ended well, from the records themselves."""

    def __init__(self) -> None:
        self.failed = 0
        self.startup_error = False
        self.unwritten = False
        self.run_failure = False  # a failure outside the records (a worker process that could not start)
        self.reason: str | None = None

    def record(self, record: FileRecord) -> None:
        self.failed += record.status == "failed"

    def records_unwritten(self) -> None:
        self.unwritten = True

    def run_failed(self, reason: str) -> None:
        self.run_failure = True

    def closed(self, reason: str) -> None:
        self.reason = reason

    def crawl_done(self, task: asyncio.Future[Any]) -> None:
        """Say why a crawl could not start in one line, without a traceback, when it is ours."""
        exc = None if task.cancelled() else task.exception()
        if isinstance(exc, StartupError):
            self.startup_error = True
            logger.error("Cannot start: %s", exc)
        elif exc is not None:
            logger.error("The crawl could not start", exc_info=exc)


class Command(ScrapyCrawlCommand):
    def run(self, args: list[str], opts: argparse.Namespace) -> None:
        if len(args) != 1:
            raise UsageError("give exactly one spider name, e.g. scrapy crawl fetch -a list=urls.txt")
        assert self.crawler_process and self.settings is not None
        level = logging.getLevelName(self.settings.get("LOG_LEVEL"))
        if level >= logging.INFO:
            for name in ("scrapy.middleware", "scrapy.addons", "scrapy.crawler"):
                logging.getLogger(name).addFilter(_StartupChatter())
            for name in _PER_FILE_DEBUG:
                logging.getLogger(name).setLevel(level)
        crawler = self._create_crawler(args[0])
        # Bad arguments (a missing list file) are a usage error, not a traceback.
        check = getattr(crawler.spidercls, "check_arguments", None)
        if check is not None:
            try:
                check(**opts.spargs)
            except ValueError as exc:
                if self.settings.get("LOG_FILE"):  # Scrapyd: the job's log is where its reason is looked for
                    logger.error("Cannot start: %s", exc)
                raise UsageError(str(exc), print_help=False) from exc
        outcome = _Outcome()
        crawler.signals.connect(outcome.record, signal=fetcher_signals.file_finished, weak=False)
        crawler.signals.connect(outcome.records_unwritten, signal=fetcher_signals.records_unwritten, weak=False)
        crawler.signals.connect(outcome.run_failed, signal=fetcher_signals.run_failed, weak=False)
        crawler.signals.connect(outcome.closed, signal=signals.spider_closed, weak=False)
        task = self.crawler_process.crawl(crawler, **opts.spargs)
        if isinstance(task, asyncio.Future):
            task.add_done_callback(outcome.crawl_done)
        self.crawler_process.start()
        # The run is over. Python's teardown would now search every object left for reference
        # cycles (about 0.1 s in every process, workers included: the empty list took 0.84x the
        # time without it, by 10 pairs). Frozen, they are still freed as the modules are cleared;
        # only cycles are left to the process's end (every file was closed at spider_closed).
        gc.freeze()
        if self.crawler_process.bootstrap_failed or outcome.startup_error:
            self.exitcode = 1
            return
        complete = getattr(crawler.spider, "list_complete", None)
        finished = complete if complete is not None else outcome.reason == "finished"
        if not finished or outcome.failed or outcome.unwritten or outcome.run_failure:
            self.exitcode = 1
