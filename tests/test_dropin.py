"""Teams already running Scrapy: the pipeline and handler dropped into their own spider's settings."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

from tests.conftest import SCRAPY, Fetch
from tests.origin import Origin, content_bytes, expected_digest

SPIDER = '''
import scrapy


class Catalogue(scrapy.Spider):
    name = "catalogue"
    custom_settings = {
        "ITEM_PIPELINES": {"fetcher.pipelines.StreamingFilesPipeline": 1},
        "DOWNLOAD_HANDLERS": {
            "http": "fetcher.handlers.StreamingDownloadHandler",
            "https": "fetcher.handlers.StreamingDownloadHandler",
        },
        "EXTENSIONS": {"fetcher.extensions.Summary": 110},
        "FILES_STORE": "store",
    }

    def __init__(self, base, **kwargs):
        super().__init__(**kwargs)
        self.base = base

    async def start(self):
        yield scrapy.Request(self.base + "/text/catalogue")

    def parse(self, response):
        # An ordinary page, fetched by the stock handler through ours.
        urls = [self.base + path for path in response.text.split()]
        yield {"name": "bundle", "file_urls": urls}
'''


def test_stock_item_fields_work_in_another_spider(fetch: Fetch, origin: Origin, tmp_path: Path) -> None:
    origin.texts["catalogue"] = "/gen/3k/one.bin /gen/5m/two.bin /status/404"
    (tmp_path / "catalogue.py").write_text(textwrap.dedent(SPIDER))
    env = fetch.env()
    env.pop("SCRAPY_SETTINGS_MODULE")  # their project, not ours
    proc = subprocess.run(
        [SCRAPY, "runspider", "catalogue.py", "-a", f"base={origin.url}", "-O", "items.json",
         "-s", "TELNETCONSOLE_ENABLED=False", "-s", "REMOTE_CONTROL_ENABLED=False"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    [item] = json.loads((tmp_path / "items.json").read_text())
    files = {f["url"].removeprefix(origin.url): f for f in item["files"]}
    assert set(files) == {"/gen/3k/one.bin", "/gen/5m/two.bin"}  # the 404 is left out, as stock does
    for path, name, size in [("/gen/3k/one.bin", "one.bin", 3 * 1024), ("/gen/5m/two.bin", "two.bin", 5 << 20)]:
        f = files[path]
        assert set(f) == {"url", "path", "checksum", "status"}  # stock FilesPipeline's keys
        assert f["status"] == "downloaded" and f["checksum"] == expected_digest(name, size)
        assert (tmp_path / "store" / f["path"]).read_bytes() == content_bytes(name, size)
    manifest = [json.loads(line) for line in (tmp_path / "store/manifest.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in manifest) == ["downloaded", "downloaded", "failed"]


def test_forgetting_the_handler_gives_a_clear_failure(fetch: Fetch, origin: Origin, tmp_path: Path) -> None:
    origin.texts["catalogue"] = "/gen/1k/alone.bin"
    spider = textwrap.dedent(SPIDER).replace('"DOWNLOAD_HANDLERS"', '"_NO_DOWNLOAD_HANDLERS"')
    (tmp_path / "catalogue.py").write_text(spider)
    env = fetch.env()
    env.pop("SCRAPY_SETTINGS_MODULE")
    proc = subprocess.run(
        [SCRAPY, "runspider", "catalogue.py", "-a", f"base={origin.url}",
         "-s", "TELNETCONSOLE_ENABLED=False", "-s", "REMOTE_CONTROL_ENABLED=False"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    [record] = [json.loads(line) for line in (tmp_path / "store/manifest.jsonl").read_text().splitlines()]
    assert record["status"] == "failed"
    assert "fetcher.handlers.StreamingDownloadHandler" in record["error"]
    assert "fetcher.handlers.StreamingDownloadHandler" in proc.stderr
