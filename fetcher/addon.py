"""fetcher as a Scrapy add-on: ``ADDONS = {"fetcher.Addon": 0}`` is the whole setup.

The add-on puts fetcher's components into the project's own component dicts
(merged, never replacing them) and sets every ``FETCHER_*`` default at add-on
priority, so that the project's settings, a spider's ``custom_settings`` and
``-s`` still win. The defaults are written once, in fetcher/config.py.

Outside the fetch project the pipeline behaves as stock FilesPipeline does
(``full/<sha1>.<ext>`` paths, md5, no redirects, empty bodies refused); the
fetch project's ``settings.py`` opts into fetcher's own choices.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from scrapy.pipelines.files import FilesPipeline
from scrapy.pipelines.images import ImagesPipeline
from scrapy.settings import SETTINGS_PRIORITIES
from scrapy.utils.misc import load_object

from fetcher.config import DEFAULTS
from fetcher.exceptions import StartupError
from fetcher.logs import redact_log_records
from fetcher.pipelines import StreamingFilesPipeline

if TYPE_CHECKING:
    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings

logger = logging.getLogger(__name__)

#: The pipeline's order when the project has no FilesPipeline to put it in place of.
_PIPELINE_ORDER = 1
#: The other components, as (setting, import path, order).
_COMPONENTS = (
    ("DOWNLOADER_MIDDLEWARES", "fetcher.middlewares.RedirectGuardMiddleware", 650),  # before RedirectMiddleware
    ("EXTENSIONS", "fetcher.extensions.Progress", 90),  # before the summary: its bar closes first
    ("EXTENSIONS", "fetcher.extensions.Summary", 110),
    ("EXTENSIONS", "fetcher.extensions.WorkerReport", 120),  # in a worker process only
    ("EXTENSIONS", "scrapy.extensions.logstats.LogStats", None),  # fetcher's progress lines say it
)
#: Scrapy's control servers, by the setting that turns each off. Turned off, one is left out of
#: EXTENSIONS_BASE rather than loaded to raise NotConfigured: loading the remote control imports
#: aiohttp, 80 ms of every start (a worker process's too), and any key naming it is loaded.
_CONTROL_SERVERS = (
    ("REMOTE_CONTROL_ENABLED", "scrapy.extensions.remote_control.RemoteControl"),
    ("TELNETCONSOLE_ENABLED", "scrapy.extensions.telnet.TelnetConsole"),
)
_HANDLER = "fetcher.handlers.StreamingDownloadHandler"
_STATS = "fetcher.statscollectors.MemoryStatsCollector"  # in place of Scrapy's default one
_COMMANDS = "fetcher.commands"


class Addon:
    """Enables fetcher in any Scrapy project: streaming download handler for
    http/https, the streaming FilesPipeline (in place of stock FilesPipeline if the
    project has it), redirect guard, progress and summary, a lighter stats collector
    (unless the project chose one), and fetcher's defaults."""

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Addon:
        return cls(crawler)

    def update_settings(self, settings: BaseSettings) -> None:
        redact_log_records()  # before Scrapy logs the settings: no credential in any log line
        if not settings.getbool("TWISTED_REACTOR_ENABLED", True):
            # Scrapy's experimental asyncio-only mode puts its own handler (aiohttp, bodies in
            # memory) in place of fetcher's, after the add-ons, at a priority they cannot outrank.
            # What a handler for that mode lacks: issue #18's trial, in bench/README.md.
            raise StartupError("fetcher needs Twisted's reactor to stream bodies to disk: "
                               "TWISTED_REACTOR_ENABLED=False is not supported")
        for name, value in DEFAULTS.items():
            settings.set(name, value, priority="addon")
        self._place_pipeline(settings, StreamingFilesPipeline)
        for name, path, order in _COMPONENTS:
            settings.setdefault_in_component_priority_dict(name, load_object(path), order)
        self._leave_out_control_servers(settings)
        if settings.getpriority("STATS_CLASS") == SETTINGS_PRIORITIES["default"]:  # a collector chosen stays
            settings.set("STATS_CLASS", _STATS, priority="addon")
        handlers = settings.getdict("DOWNLOAD_HANDLERS")
        handlers.update({"http": _HANDLER, "https": _HANDLER})
        settings.set("DOWNLOAD_HANDLERS", handlers, settings.getpriority("DOWNLOAD_HANDLERS") or 0)
        if settings.get("COMMANDS_MODULE") != _COMMANDS:
            logger.warning(
                "fetcher: `scrapy crawl` exits 0 even when files failed unless the project sets "
                "COMMANDS_MODULE = %r (an add-on cannot choose the command)", _COMMANDS)

    @staticmethod
    def _leave_out_control_servers(settings: BaseSettings) -> None:
        """Scrapy's control servers that are turned off are never loaded (see _CONTROL_SERVERS)."""
        base = settings.getdict("EXTENSIONS_BASE")
        off = [path for enabled, path in _CONTROL_SERVERS if not settings.getbool(enabled) and path in base]
        if off:
            for path in off:
                del base[path]
            settings.set("EXTENSIONS_BASE", base, settings.getpriority("EXTENSIONS_BASE") or 0)

    @staticmethod
    def _place_pipeline(settings: BaseSettings, ours: type) -> None:
        """fetcher's pipeline takes stock FilesPipeline's place; a project that lists
        a subclass of fetcher's already has it; a subclass of stock's is left alone
        (it would buffer bodies) with a warning, rather than downloading twice."""
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
