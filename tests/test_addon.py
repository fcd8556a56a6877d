"""An existing Scrapy project switches to fetcher: the add-on line, its FilesPipeline
subclass's base class imported from fetcher, and COMMANDS_MODULE. Nothing else changes,
and its paths and item fields stay what stock FilesPipeline gave."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, SCRAPY
from tests.origin import Origin, content_bytes

SETTINGS = """
BOT_NAME = "shop"
SPIDER_MODULES = ["shop.spiders"]
ITEM_PIPELINES = {"shop.pipelines.ShopFilesPipeline": 300}
FILES_STORE = "files"
TELNETCONSOLE_ENABLED = False
REMOTE_CONTROL_ENABLED = False
LOG_LEVEL = "INFO"
"""

PIPELINE = """
import scrapy
from scrapy.pipelines.files import FilesPipeline


class ShopFilesPipeline(FilesPipeline):
    # The Scrapy docs' own example: a header of its own, plain Requests.
    def get_media_requests(self, item, info):
        for url in item["file_urls"]:
            yield scrapy.Request(url, headers={"X-Shop": item["sku"]})

    def file_path(self, request, response=None, info=None, *, item=None):
        return f"{item['sku']}/{request.url.rsplit('/', 1)[-1]}"

    def item_completed(self, results, item, info):
        item["file_paths"] = [x["path"] for ok, x in results if ok]
        return super().item_completed(results, item, info)  # and stock's `files` field
"""

SPIDER = """
import scrapy


class Catalogue(scrapy.Spider):
    name = "catalogue"

    def __init__(self, base, **kwargs):
        super().__init__(**kwargs)
        self.base = base

    async def start(self):
        yield scrapy.Request(self.base + "/text/shop-catalogue")

    def parse(self, response):
        for line in response.text.splitlines():
            sku, *paths = line.split()
            yield {"sku": sku, "file_urls": [self.base + p for p in paths]}
"""

CATALOGUE = "\n".join([
    "A1 /gen/3k/one.bin /gen/700k/two.bin",
    "B2 /gen/5m/three.bin /status/404",
    "C3 /redirect/1/gen/2k/moved.bin /gen/0/empty.bin",
])


def make_project(where: Path, *, fetcher: bool, settings: str = "", pipeline: str = "") -> Path:
    """The shop project; with *fetcher*, the three lines that switch it."""
    pkg = where / "shop"
    (pkg / "spiders").mkdir(parents=True)
    (where / "scrapy.cfg").write_text("[settings]\ndefault = shop.settings\n")
    (pkg / "__init__.py").write_text("")
    (pkg / "spiders" / "__init__.py").write_text("")
    (pkg / "spiders" / "catalogue.py").write_text(textwrap.dedent(SPIDER))
    text = SETTINGS + settings
    code = textwrap.dedent(PIPELINE) + pipeline
    if fetcher:
        text += 'ADDONS = {"fetcher.Addon": 0}\nCOMMANDS_MODULE = "fetcher.commands"\n'
        code = code.replace("from scrapy.pipelines.files import FilesPipeline", "from fetcher import FilesPipeline")
    (pkg / "settings.py").write_text(text)
    (pkg / "pipelines.py").write_text(code)
    return where


def crawl(project: Path, origin: Origin, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRAPY_")}
    env["PYTHONPATH"] = str(ROOT)  # fetcher itself, as if pip-installed
    (project / "items.json").unlink(missing_ok=True)
    proc = subprocess.run([SCRAPY, "crawl", "catalogue", "-a", f"base={origin.url}", "-O", "items.json", *args],
                          cwd=project, env=env, capture_output=True, text=True, timeout=180)
    items = json.loads((project / "items.json").read_text()) if (project / "items.json").exists() else []
    return proc.returncode, sorted(items, key=lambda i: i["sku"]), proc.stderr


def files_in(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*")
            if p.is_file() and ".fetcher" not in p.parts and p.name not in ("manifest.jsonl", "failed.txt")}


@pytest.fixture
def shop_origin(origin: Origin) -> Origin:
    origin.texts["shop-catalogue"] = CATALOGUE
    return origin


def test_switching_keeps_paths_and_items_and_adds_records_and_exit_status(
        shop_origin: Origin, tmp_path: Path) -> None:
    origin = shop_origin
    stock = make_project(tmp_path / "stock", fetcher=False)
    ours = make_project(tmp_path / "ours", fetcher=True)
    stock_rc, stock_items, _ = crawl(stock, origin)
    origin.reset_stats()
    rc, items, log = crawl(ours, origin)

    assert items == stock_items  # sku, file_urls, files (url, path, md5 checksum, status) and file_paths
    assert [i["file_paths"] for i in items] == [["A1/one.bin", "A1/two.bin"], ["B2/three.bin"], []]
    assert items[0]["files"][0]["status"] == "downloaded"
    assert files_in(ours / "files") == files_in(stock / "files")
    assert (ours / "files/B2/three.bin").read_bytes() == content_bytes("three.bin", 5 << 20)
    headers = {r["path"]: r["headers"] for r in origin.stats.snapshot().requests}
    assert {k.lower(): v for k, v in headers["/gen/3k/one.bin"].items()}["x-shop"] == "A1"  # the subclass's header

    # What fetcher adds: a record of every URL, failures with reasons, and the exit status.
    records = {r["url"].removeprefix(origin.url): r
               for r in map(json.loads, (ours / "files/manifest.jsonl").read_text().splitlines())}
    assert records["/gen/5m/three.bin"]["status"] == "downloaded"
    assert records["/status/404"]["error"] == "HTTP 404"
    assert records["/redirect/1/gen/2k/moved.bin"]["error"] == "HTTP 302"  # MEDIA_ALLOW_REDIRECTS=False, as stock
    assert records["/gen/0/empty.bin"]["error"].startswith("empty body")  # stock refuses empty files too
    assert stock_rc == 0 and rc == 1
    assert "failed.txt" in log and "COMMANDS_MODULE" not in log

    # A rerun: stock says uptodate from the files' age; fetcher from its records, with no body fetched.
    origin.reset_stats()
    _, stock_again, _ = crawl(stock, origin)
    origin.reset_stats()
    _, again, _ = crawl(ours, origin)
    assert again == stock_again
    assert {f["status"] for i in again for f in i["files"]} == {"uptodate"}
    assert origin.stats.bytes_by_path["/gen/5m/three.bin"] == 0

    # FILES_EXPIRES=0: stock downloads everything again, and so does fetcher.
    origin.reset_stats()
    _, expired, _ = crawl(ours, origin, "-s", "FILES_EXPIRES=0")
    assert {f["status"] for i in expired for f in i["files"]} == {"downloaded"}
    assert origin.stats.bytes_by_path["/gen/5m/three.bin"] == 5 << 20


def test_a_cached_response_is_saved_with_status_cached(shop_origin: Origin, tmp_path: Path) -> None:
    """A project with Scrapy's HTTP cache: what the cache holds is saved from it;
    streamed bodies are never put into the cache."""
    cache = f'HTTPCACHE_ENABLED = True\nHTTPCACHE_DIR = "{tmp_path / "cache"}"\n'
    stock = make_project(tmp_path / "stock", fetcher=False, settings=cache)
    crawl(stock, shop_origin)  # stock fills the cache with whole bodies
    ours = make_project(tmp_path / "ours", fetcher=True, settings=cache)
    shop_origin.reset_stats()
    _, items, _ = crawl(ours, shop_origin)
    statuses = {f["url"].rsplit("/", 1)[1]: f["status"] for i in items for f in i["files"]}
    assert statuses == {"one.bin": "cached", "two.bin": "cached", "three.bin": "cached"}
    assert shop_origin.stats.bytes_by_path["/gen/5m/three.bin"] == 0
    assert (ours / "files/B2/three.bin").read_bytes() == content_bytes("three.bin", 5 << 20)

    fresh = make_project(tmp_path / "fresh", fetcher=True,
                         settings=f'HTTPCACHE_ENABLED = True\nHTTPCACHE_DIR = "{tmp_path / "cache2"}"\n')
    crawl(fresh, shop_origin)
    cached_bytes = sum(p.stat().st_size for p in (tmp_path / "cache2").rglob("response_body"))
    assert cached_bytes < 64 * 1024  # the catalogue page only: no streamed file went into the cache
    shutil.rmtree(tmp_path / "cache2")


def test_hooks_streaming_cannot_call_are_named_at_start(shop_origin: Origin, tmp_path: Path) -> None:
    extra = """

    def file_downloaded(self, response, request, info, *, item=None):
        raise AssertionError("never called: the body is on disk")
"""
    ours = make_project(tmp_path / "ours", fetcher=True,
                        pipeline=textwrap.indent(textwrap.dedent(extra), "    "))
    _, items, log = crawl(ours, shop_origin)
    assert "ShopFilesPipeline.file_downloaded is not called" in log and "file_stored" in log
    assert items[0]["file_paths"] == ["A1/one.bin", "A1/two.bin"]


def test_file_stored_and_file_path_with_the_response(shop_origin: Origin, tmp_path: Path) -> None:
    """fetcher's documented stand-in for file_downloaded, and a file_path that
    names files after the response's Content-Type, as stock lets it."""
    extra = """

    def file_path(self, request, response=None, info=None, *, item=None):
        kind = response.headers.get("Content-Type", b"none").decode().replace("/", "-") if response else "pending"
        return f"{item['sku']}/{kind}/{request.url.rsplit('/', 1)[-1]}"

    def file_stored(self, file_info, response, request, info, *, item=None):
        file_info["size"] = (Path(self.store.basedir) / file_info["path"]).stat().st_size
        return file_info
"""
    ours = make_project(tmp_path / "ours", fetcher=True, pipeline=textwrap.indent(textwrap.dedent(extra), "    "))
    code = (ours / "shop/pipelines.py").read_text()
    (ours / "shop/pipelines.py").write_text("from pathlib import Path\n" + code)
    _, items, _ = crawl(ours, shop_origin)
    [one, two] = items[0]["files"]
    assert one["path"] == "A1/application-octet-stream/one.bin" and one["size"] == 3 * 1024
    assert (ours / "files" / two["path"]).read_bytes() == content_bytes("two.bin", 700 * 1024)
    assert not (ours / "files/A1/pending").exists()  # the name it had while downloading is gone
