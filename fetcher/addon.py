"""fetcher as a Scrapy add-on: ``ADDONS = {"fetcher.Addon": 0}`` is the whole setup.

The add-on puts fetcher's components into the project's own component dicts
(merged, never replacing them) and sets every ``FETCHER_*`` default at add-on
priority, so that the project's settings, a spider's ``custom_settings`` and
``-s`` still win. The defaults below are the only place they are set.

Outside the fetch project the pipeline behaves as stock FilesPipeline does
(``full/<sha1>.<ext>`` paths, md5, no redirects, empty bodies refused); the
fetch project's ``settings.py`` opts into fetcher's own choices.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from scrapy.utils.misc import load_object

if TYPE_CHECKING:
    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings

logger = logging.getLogger(__name__)

#: Every FETCHER_* setting and its default.
DEFAULTS: dict[str, Any] = {
    # -- Where files go and how they are named
    "FETCHER_LAYOUT": "hash",  # "hash": stock's full/<sha1>.<ext>; "url": <host>[:port]/<url path>[?query]
    "FETCHER_ALGORITHM": "md5",  # hashlib name of the digest in the records and in `files` (stock: md5)
    "FETCHER_NAME_QUERY": True,  # "url" layout: keep a URL's query string in its file name
    "FETCHER_EMPTY_FILES": False,  # keep a 0-byte body as a file (stock refuses it: "empty-content")
    # -- The store's records (one current record per URL, across runs), in an SQLite index
    "FETCHER_STATE_DIR": "",  # "": <FILES_STORE>/.fetcher, or for a remote store ~/.local/state/fetcher/<store>
    "FETCHER_MANIFEST": "",  # one JSON line per URL; "": manifest.jsonl in FILES_STORE (remote: in the state folder)
    "FETCHER_FAILED_LIST": "",  # the store's failures in list format; "": failed.txt beside the manifest
    "FETCHER_VERIFY": "stat",  # finished files: "stat" compares size and mtime with the record; "full" re-hashes
    # -- Remote stores (s3://, gs://, ftp://)
    "FETCHER_SPOOL": "",  # where bodies are written before upload; "": <tmp>/fetcher-spool/<store>
    "FETCHER_MULTIPART_THRESHOLD": 8 * 1024 * 1024,  # larger files are uploaded in parts of this size
    # -- Transfers
    "FETCHER_MAX_SIZE": 0,  # bytes; a larger file fails (0: no cap; meta download_maxsize per request)
    "FETCHER_RESUME": True,  # continue a .part file with Range/If-Range instead of starting over
    "FETCHER_REVALIDATE": False,  # ask the server (If-None-Match/If-Modified-Since) about finished files
    "FETCHER_FSYNC": False,  # fsync each file before renaming it into place
    "FETCHER_STALL_TIMEOUT": None,  # seconds without body bytes before an attempt is abandoned; None: DOWNLOAD_TIMEOUT
    "FETCHER_MAX_TIME": 0,  # seconds one attempt may take in all (0: no limit)
    "FETCHER_MAX_RATE": 0,  # bytes/s (or "512K", "2M") for all transfers together (0: no cap); wget's --limit-rate
    "FETCHER_MAX_RATE_PER_HOST": 0,  # bytes/s for each host (downloader slot) across its transfers (0: no cap)
    "FETCHER_SPLIT": 1,  # ranges fetched at once per file (aria2's split=; a list entry's split= wins)
    "FETCHER_MIN_SPLIT_SIZE": 20 * 1024 * 1024,  # no range shorter than this (aria2's -k): smaller files, one
    # -- Retries (RETRY_TIMES, RETRY_HTTP_CODES, RETRY_EXCEPTIONS say which and how often)
    "FETCHER_BACKOFF_BASE": 1.0,  # first retry waits about this long (seconds), doubling each time
    "FETCHER_BACKOFF_MAX": 60.0,  # cap on the exponential backoff (seconds)
    "FETCHER_RETRY_AFTER_MAX": 600.0,  # cap on a server's Retry-After (seconds)
    # -- The fetch spider and what a person sees
    "FETCHER_MAX_PENDING": 1000,  # list entries in progress at once, at least 2 x CONCURRENT_REQUESTS
    "FETCHER_PROGRESS": "auto",  # "bar" on a terminal, "log" lines otherwise; or "bar", "log", "off"
    "FETCHER_PROGRESS_INTERVAL": 60.0,  # seconds between progress log lines (the "log" mode)
    "FETCHER_INVOKED_AS": "",  # set by the `fetcher` console command, so messages show its rerun command
    # -- A shared queue (scrapy enqueue REDIS_URL LIST; scrapy crawl fetch -a list=REDIS_URL)
    "FETCHER_QUEUE_LEASE": 60.0,  # seconds an entry stays a dead worker's before another takes it
    "FETCHER_QUEUE_IDLE": 10.0,  # a worker ends after this long with nothing waiting or in flight; 0: never
    "FETCHER_QUEUE_MAX_DELIVERIES": 5,  # an entry delivered this often without an ack is dead-lettered
}

#: The pipeline's order when the project has no FilesPipeline to put it in place of.
_PIPELINE_ORDER = 1
#: The other components, as (setting, import path, order).
_COMPONENTS = (
    ("DOWNLOADER_MIDDLEWARES", "fetcher.middlewares.RedirectGuardMiddleware", 650),  # before RedirectMiddleware
    ("EXTENSIONS", "fetcher.extensions.Progress", 90),  # before the summary: its bar closes first
    ("EXTENSIONS", "fetcher.extensions.Summary", 110),
    ("EXTENSIONS", "scrapy.extensions.logstats.LogStats", None),  # fetcher's progress lines say it
)
#: Scrapy settings the add-on sets (at add-on priority: a project's own value wins).
_SCRAPY_SETTINGS = {
    "LOG_FORMATTER": "fetcher.logformatter.LogFormatter",  # Scrapy's log lines without URL credentials
}
_HANDLER = "fetcher.handlers.StreamingDownloadHandler"
_COMMANDS = "fetcher.commands"


class Addon:
    """Enables fetcher in any Scrapy project: streaming download handler for
    http/https, the streaming FilesPipeline (in place of stock FilesPipeline if the
    project has it), redirect guard, progress and summary, and fetcher's defaults."""

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Addon:
        return cls(crawler)

    def update_settings(self, settings: BaseSettings) -> None:
        for name, value in {**DEFAULTS, **_SCRAPY_SETTINGS}.items():
            settings.set(name, value, priority="addon")
        from fetcher.pipelines import StreamingFilesPipeline  # noqa: PLC0415 - the pipeline imports this module

        self._place_pipeline(settings, StreamingFilesPipeline)
        for name, path, order in _COMPONENTS:
            settings.setdefault_in_component_priority_dict(name, load_object(path), order)
        handlers = settings.getdict("DOWNLOAD_HANDLERS")
        handlers.update({"http": _HANDLER, "https": _HANDLER})
        settings.set("DOWNLOAD_HANDLERS", handlers, settings.getpriority("DOWNLOAD_HANDLERS") or 0)
        if settings.get("COMMANDS_MODULE") != _COMMANDS:
            logger.warning(
                "fetcher: `scrapy crawl` exits 0 even when files failed unless the project sets "
                "COMMANDS_MODULE = %r (an add-on cannot choose the command)", _COMMANDS)

    @staticmethod
    def _place_pipeline(settings: BaseSettings, ours: type) -> None:
        """fetcher's pipeline takes stock FilesPipeline's place; a project that lists
        a subclass of fetcher's already has it; a subclass of stock's is left alone
        (it would buffer bodies) with a warning, rather than downloading twice."""
        from scrapy.pipelines.files import FilesPipeline  # noqa: PLC0415
        from scrapy.pipelines.images import ImagesPipeline  # noqa: PLC0415

        pipelines = settings.getdict("ITEM_PIPELINES")
        enabled = [load_object(p) for p, order in pipelines.items() if order is not None]
        if any(isinstance(c, type) and issubclass(c, ours) for c in enabled):
            return
        if FilesPipeline in enabled:
            settings.replace_in_component_priority_dict("ITEM_PIPELINES", FilesPipeline, ours)
            return
        stock = [c for c in enabled if isinstance(c, type) and issubclass(c, FilesPipeline)
                 and not issubclass(c, ImagesPipeline)]  # images (image_urls) are another pipeline's work
        if stock:
            logger.warning(
                "fetcher: %s subclasses scrapy.pipelines.files.FilesPipeline, so its files are held in memory; "
                "import its base class from fetcher instead (from fetcher import FilesPipeline) to stream them",
                ", ".join(f"{c.__module__}.{c.__qualname__}" for c in stock))
            return
        settings.setdefault_in_component_priority_dict("ITEM_PIPELINES", ours, _PIPELINE_ORDER)
