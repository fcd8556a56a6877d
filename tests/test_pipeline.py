"""Unit tests of the add-on's settings and the pipeline's decisions, without a crawl
(the end-to-end behaviour is in test_addon.py, test_fetch.py, test_store.py)."""

from __future__ import annotations

import asyncio
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
from scrapy import Request, Spider
from scrapy.pipelines.files import FilesPipeline as StockFilesPipeline
from scrapy.pipelines.images import ImagesPipeline
from scrapy.settings import Settings
from scrapy.statscollectors import MemoryStatsCollector as ScrapyMemoryStatsCollector
from scrapy.utils.conf import build_component_list
from scrapy.utils.test import get_crawler

from fetcher import Addon, FilesPipeline
from fetcher.config import DEFAULTS
from fetcher.listing.urllist import Entry
from fetcher.middlewares import RedirectGuardMiddleware
from fetcher.pipelines import StreamingFilesPipeline
from fetcher.statscollectors import MemoryStatsCollector
from fetcher.store.records import RecordStore, StoredRecord
from fetcher.transfer.retry import AttemptFailed

# -- the add-on


def apply_addon(project: dict[str, Any]) -> Settings:
    settings = Settings()
    settings.setdict(project, priority="project")
    Addon(get_crawler()).update_settings(settings)
    return settings


def classes(settings: Settings, name: str) -> dict[Any, Any]:
    from scrapy.utils.misc import load_object  # noqa: PLC0415

    return {load_object(k): v for k, v in settings.getdict(name).items()}


def test_addon_merges_components_and_lets_the_project_win() -> None:
    settings = apply_addon({
        "EXTENSIONS": {"scrapy.extensions.logstats.LogStats": 10},  # the project keeps its LogStats
        "FETCHER_MAX_SIZE": 123,
        "DOWNLOADER_MIDDLEWARES": {"scrapy.downloadermiddlewares.useragent.UserAgentMiddleware": None},
    })
    assert classes(settings, "ITEM_PIPELINES") == {StreamingFilesPipeline: 1}
    extensions = classes(settings, "EXTENSIONS")
    assert extensions[next(c for c in extensions if c.__name__ == "LogStats")] == 10
    assert {c.__name__ for c in extensions} >= {"Progress", "Summary"}
    middlewares = classes(settings, "DOWNLOADER_MIDDLEWARES")
    assert middlewares[RedirectGuardMiddleware] == 650 and len(middlewares) == 2  # merged, not replaced
    assert settings.getdict("DOWNLOAD_HANDLERS")["https"] == "fetcher.handlers.StreamingDownloadHandler"
    assert settings.getint("FETCHER_MAX_SIZE") == 123  # project priority beats the add-on's
    assert settings["FETCHER_LAYOUT"] == "hash" and settings["FETCHER_ALGORITHM"] == "md5"  # stock's outputs
    assert settings.getpriority("FETCHER_LAYOUT") == 15  # "addon"
    assert set(DEFAULTS) <= set(settings.attributes)


def test_addon_takes_stock_files_pipelines_place() -> None:
    settings = apply_addon({"ITEM_PIPELINES": {"scrapy.pipelines.files.FilesPipeline": 300,
                                                  "scrapy.pipelines.images.ImagesPipeline": None}})
    assert classes(settings, "ITEM_PIPELINES") == {StreamingFilesPipeline: 300, ImagesPipeline: None}


class Subclass(FilesPipeline):
    pass


class StockSubclass(StockFilesPipeline):
    pass


def test_addon_adds_its_pipeline_beside_images_pipeline() -> None:
    settings = apply_addon({"ITEM_PIPELINES": {"scrapy.pipelines.images.ImagesPipeline": 1}})
    assert classes(settings, "ITEM_PIPELINES") == {ImagesPipeline: 1, StreamingFilesPipeline: 1}


def test_addon_keeps_a_subclass_of_its_pipeline(caplog: pytest.LogCaptureFixture) -> None:
    settings = apply_addon({"ITEM_PIPELINES": {Subclass: 300}, "COMMANDS_MODULE": "fetcher.commands"})
    assert classes(settings, "ITEM_PIPELINES") == {Subclass: 300}
    assert "COMMANDS_MODULE" not in caplog.text


def test_addon_warns_about_a_stock_subclass_and_a_missing_command(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        settings = apply_addon({"ITEM_PIPELINES": {StockSubclass: 300}})
    assert classes(settings, "ITEM_PIPELINES") == {StockSubclass: 300}  # never two pipelines downloading
    assert "from fetcher import FilesPipeline" in caplog.text
    assert "COMMANDS_MODULE" in caplog.text


@pytest.mark.parametrize("enabled", [False, True])
def test_control_servers_turned_off_are_not_even_loaded(enabled: bool) -> None:
    """Loaded only to raise NotConfigured, the remote control would import aiohttp: 80 ms of
    every start. Turned on, both are Scrapy's as before."""
    settings = apply_addon({"REMOTE_CONTROL_ENABLED": enabled, "TELNETCONSOLE_ENABLED": enabled})
    extensions = build_component_list(settings.getwithbase("EXTENSIONS"))
    control = {"scrapy.extensions.remote_control.RemoteControl", "scrapy.extensions.telnet.TelnetConsole"}
    assert (control <= set(extensions)) is enabled
    assert "scrapy.extensions.corestats.CoreStats" in extensions  # the others stay


def test_addon_lightens_the_stats_collector_unless_the_project_chose_one() -> None:
    scrapys = "scrapy.statscollectors.MemoryStatsCollector"
    assert apply_addon({})["STATS_CLASS"] == "fetcher.statscollectors.MemoryStatsCollector"
    for chosen in (scrapys, "scrapy.statscollectors.DummyStatsCollector"):
        assert apply_addon({"STATS_CLASS": chosen})["STATS_CLASS"] == chosen


def test_the_lighter_stats_collector_keeps_what_scrapys_keeps() -> None:
    """Same calls, same stats, a legacy ``spider`` argument still served; what it leaves
    out is Scrapy 2.19's look-up hook on every attribute."""
    crawler = get_crawler(Fetch)
    kept = []
    for cls in (ScrapyMemoryStatsCollector, MemoryStatsCollector):
        stats = cls(crawler)
        stats.open_spider()
        stats.inc_value("files")
        stats.inc_value("files", 2)
        stats.inc_value("bytes", 10, start=5)
        stats.max_value("peak", 3)
        stats.max_value("peak", 1)
        stats.min_value("least", 3)
        stats.min_value("least", 1)
        stats.set_value("note", "x")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stats.inc_value("legacy", spider=crawler.spider)
        kept.append((dict(stats.get_stats()), stats.get_value("files"), stats.get_value("none", 7)))
        stats.close_spider(reason="finished")
    assert kept[0] == kept[1]
    assert kept[1][0] == {"files": 3, "bytes": 15, "peak": 3, "least": 1, "note": "x", "legacy": 1}
    assert type(MemoryStatsCollector(crawler)).__getattribute__ is object.__getattribute__


# -- the pipeline, built from a crawler


class Fetch(Spider):
    name = "fetch"


class Shop(Spider):
    name = "shop"


def pipeline(tmp_path: Path, cls: type[StreamingFilesPipeline] = StreamingFilesPipeline,
             spider: type[Spider] = Fetch, **settings: Any) -> StreamingFilesPipeline:
    crawler = get_crawler(spider, {"FILES_STORE": str(tmp_path / "store"), **settings})
    crawler.spider = crawler._create_spider()  # noqa: SLF001 - what crawl() does first
    built = cls.from_crawler(crawler)
    built.spiderinfo = built.SpiderInfo(crawler.spider)
    return built


def test_default_layout_is_stock_files_pipelines(tmp_path: Path) -> None:
    request = Request("http://example.invalid/a/b.pdf?x=1")
    ours = pipeline(tmp_path).file_path(request)
    assert ours == StockFilesPipeline.file_path(pipeline(tmp_path), request)
    assert ours.startswith("full/") and ours.endswith(".pdf")
    url_layout = pipeline(tmp_path, FETCHER_LAYOUT="url").file_path(request)
    assert url_layout == "example.invalid/a/b.pdf?x=1"
    entry = Entry("http://example.invalid/a/b.pdf", 1, out="named/here.pdf")
    assert pipeline(tmp_path).file_path(Request(entry.url, meta={"fetcher_entry": entry})) == "named/here.pdf"


def test_media_to_download_of_a_subclass_decides_without_a_download(tmp_path: Path) -> None:
    class Known(FilesPipeline):
        def media_to_download(self, request: Request, info: Any, *, item: Any = None) -> dict[str, Any]:
            return {"url": request.url, "path": "known.bin", "checksum": "abc", "status": "uptodate"}

    p = pipeline(tmp_path, Known)
    item = asyncio.get_event_loop().run_until_complete(p.process_item({"file_urls": ["http://example.invalid/k.bin"]}))
    assert item["files"] == [{"url": "http://example.invalid/k.bin", "path": "known.bin", "checksum": "abc",
                              "status": "uptodate"}]
    assert p.run_records.records is not None and p.run_records.records.lookup("http://example.invalid/k.bin") is None  # not fetched


def test_overridden_hooks_that_cannot_be_called_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Old(FilesPipeline):
        def file_downloaded(self, response: Any, request: Any, info: Any, *, item: Any = None) -> str:
            return ""

    with caplog.at_level(logging.WARNING):
        pipeline(tmp_path, Old)
    assert "Old.file_downloaded is not called" in caplog.text and "file_stored" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pipeline(tmp_path, Subclass)
    assert "is not called" not in caplog.text


def test_a_store_of_url_named_files_is_warned_before_its_layout_changes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = tmp_path / "store"
    records = RecordStore.open(store / ".fetcher", store / "manifest.jsonl", store / "failed.txt")
    records.put(StoredRecord(url="http://h/a.bin", status="downloaded", path="h/a.bin", size=1))
    records.close()
    with caplog.at_level(logging.WARNING):
        pipeline(tmp_path)
    assert "FETCHER_LAYOUT = 'url'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pipeline(tmp_path, FETCHER_LAYOUT="hash")  # chosen by the project: nothing to warn about
    assert "FETCHER_LAYOUT" not in caplog.text


def test_rerun_hint_fits_how_the_run_was_started(tmp_path: Path) -> None:
    assert pipeline(tmp_path).run_records.rerun_hint() == f"Retry them with: scrapy crawl fetch -a list={tmp_path}/store/failed.txt"
    assert pipeline(tmp_path, FETCHER_INVOKED_AS="fetcher").run_records.rerun_hint() == \
        f"Retry them with: fetcher {tmp_path}/store/failed.txt"
    assert "scrapy crawl shop` again" in pipeline(tmp_path, spider=Shop).run_records.rerun_hint()


def test_expiry_counts_days_like_stock(tmp_path: Path) -> None:
    fresh = pipeline(tmp_path, FILES_EXPIRES=2).transfers.freshness
    assert not fresh.expired("2999-01-01T00:00:00.000Z")
    assert fresh.expired("2000-01-01T00:00:00.000Z")
    assert not fresh.expired(None)
    assert pipeline(tmp_path, FILES_EXPIRES=0).transfers.freshness.expired(1.0)


def test_retry_stats_reasons_are_scrapys() -> None:
    try:
        raise AttemptFailed("x", reason="timeout", retryable=True) from TimeoutError()
    except AttemptFailed as outcome:
        assert outcome.stats_reason == "builtins.TimeoutError"
    assert AttemptFailed("HTTP 503", reason="HTTP 503", retryable=True, http_status=503).stats_reason == \
        "503 Service Unavailable"


def test_the_fetch_items_fields_are_the_manifests() -> None:
    """A feed of the fetch spider's items is its records: a field added to the manifest must be
    one of the item's too (set_record would set it, but no feed would export it)."""
    from dataclasses import fields

    from fetcher.items import FetchItem
    from fetcher.store.records import MANIFEST_FIELDS

    assert [f.name for f in fields(FetchItem)] == ["file_urls", "files", *MANIFEST_FIELDS]
