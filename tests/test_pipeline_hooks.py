"""FilesPipeline's contract under fetcher, where a subclass or a server does what stock allows:
its own open_spider/close_spider, a file_path that names files after the response or raises,
a header line without a colon; and the fetch spider's items as flat records in a feed."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

from tests.conftest import Fetch, Run
from tests.origin import Origin, content_bytes, expected_digest

PIPELINES = """
from fetcher import FilesPipeline


class OpenWithSuper(FilesPipeline):
    # A database opened beside the files, closed at the end: stock's open_spider is a plain method.
    def open_spider(self, spider=None):
        super().open_spider(spider)
        self.db = "open"

    def close_spider(self, spider=None):
        self.db = None


class OpenWithoutSuper(FilesPipeline):
    def open_spider(self, spider=None):
        self.db = "open"

    def close_spider(self, spider=None):
        self.db = None


class ByType(FilesPipeline):
    # Named after the response once it is known: two URLs can end at one name.
    def file_path(self, request, response=None, info=None, *, item=None):
        if response is None:
            return "pending/" + request.url.rsplit("/", 1)[-1]
        return "by-type/" + response.headers.get("Content-Type", b"none").decode().replace("/", "-")


class Unnamed(FilesPipeline):
    def file_path(self, request, response=None, info=None, *, item=None):
        if "refused" in request.url:
            raise RuntimeError("no name for this one")
        return super().file_path(request, response, info, item=item)
"""


def run_with(fetch: Fetch, pipeline: str, list_text: str, *args: str) -> Run:
    """The fetch spider with one of the pipeline subclasses above in place of fetcher's."""
    (fetch.cwd / "hooks_pipelines.py").write_text(textwrap.dedent(PIPELINES))
    (fetch.cwd / "urls.txt").write_text(list_text)
    env = fetch.env()
    env["PYTHONPATH"] = f"{fetch.cwd}:{env['PYTHONPATH']}"
    settings = {"ITEM_PIPELINES": json.dumps({f"hooks_pipelines.{pipeline}": 1})}
    proc = subprocess.run(fetch.command("-a", "list=urls.txt", *args, settings=settings), cwd=fetch.cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    return Run(proc.returncode, proc.stdout, proc.stderr, fetch.cwd)


def test_a_subclass_with_its_own_open_and_close_spider_keeps_fetchers_work(fetch: Fetch, origin: Origin) -> None:
    """With or without super(), the manifest is compacted and failed.txt written at the end:
    fetcher's opening and closing hang on signals, not on the methods a subclass replaces."""
    urls = [f"{origin.url}/gen/3k/own-open.bin", f"{origin.url}/status/404"]
    for pipeline in ("OpenWithSuper", "OpenWithoutSuper"):
        run = run_with(fetch, pipeline, "\n".join(urls) + "\n")
        assert run.returncode == 1, run.log[-3000:]  # the 404
        assert "never awaited" not in run.log and "Traceback" not in run.log, run.log[-3000:]
        assert run.record(urls[0])["status"] in ("downloaded", "uptodate")
        assert run.record(urls[1])["status"] == "failed"
        failed = (run.store / "failed.txt").read_text()
        assert urls[1] in failed and urls[0] not in failed, failed
        assert len(run.manifest) == 2, run.manifest  # compacted: one line per URL after the rerun


def test_a_name_taken_from_the_response_is_claimed_like_any_other(fetch: Fetch, origin: Origin) -> None:
    """Both files are application/octet-stream: the second to reach the name gets the "path
    conflict" answer, and the first file is intact (no silent overwrite)."""
    urls = {f"{origin.url}/gen/3k/first.bin": ("first.bin", 3 * 1024),
            f"{origin.url}/gen/5k/second.bin": ("second.bin", 5 * 1024)}
    run = run_with(fetch, "ByType", "".join(f"{u}\n" for u in urls))
    assert run.returncode == 1, run.log[-3000:]
    records = {u: run.record(u) for u in urls}
    won = [u for u, r in records.items() if r["status"] == "downloaded"]
    lost = [u for u, r in records.items() if r["status"] == "failed"]
    assert len(won) == 1 and len(lost) == 1, records
    assert "another URL of this run is saved to by-type/application-octet-stream" in records[lost[0]]["error"]
    name, size = urls[won[0]]
    assert records[won[0]]["path"] == "by-type/application-octet-stream"
    assert (run.store / "by-type/application-octet-stream").read_bytes() == content_bytes(name, size)
    assert records[won[0]]["checksum"] == expected_digest(name, size)
    assert not list(run.store.rglob("*.part")), "the loser's body is not left behind"


def test_a_file_path_that_raises_is_logged_with_its_traceback_once(fetch: Fetch, origin: Origin) -> None:
    good, refused = f"{origin.url}/gen/2k/kept.bin", f"{origin.url}/gen/2k/refused.bin"
    run = run_with(fetch, "Unnamed", f"{good}\n{refused}\n")
    assert run.returncode == 1
    assert run.log.count("RuntimeError: no name for this one") == 1, run.log[-3000:]
    assert "Traceback (most recent call last)" in run.log
    assert run.record(good)["status"] == "downloaded"
    record = run.record(refused)
    assert record["status"] == "failed" and "no name for this one" in record["error"], record


def test_a_header_line_without_a_colon_is_skipped_as_stock_does(fetch: Fetch, origin: Origin) -> None:
    url = f"{origin.url}/gen/64k/colonless.bin?colonless_header=1"
    run = fetch(f"{url}\n")
    assert run.returncode == 0, run.log[-3000:]
    record = run.record(url)
    assert record["status"] == "downloaded" and record["checksum"] == expected_digest("colonless.bin", 64 * 1024)


def test_the_fetch_spiders_items_are_its_records_flat(fetch: Fetch, origin: Origin) -> None:
    """-O out.jsonl (as Scrapyd's items_url) holds one flat line per URL: the manifest's
    fields at the top level, `uptodate` on a rerun as the manifest says."""
    urls = [f"{origin.url}/gen/1k/flat-a.bin", f"{origin.url}/status/410"]
    for expected in ("downloaded", "uptodate"):
        run = fetch("\n".join(urls) + "\n", "-O", "out.jsonl")
        assert run.returncode == 1, run.log[-3000:]
        items = {i["url"]: i for i in map(json.loads, (fetch.cwd / "out.jsonl").read_text().splitlines())}
        manifest = {r["url"]: r for r in run.manifest}
        assert set(items) == set(urls)
        assert items[urls[0]]["status"] == expected and items[urls[1]]["status"] == "failed"
        for url in urls:
            assert items[url] == manifest[url], (items[url], manifest[url])
        assert "record" not in items[urls[0]] and "file_urls" not in items[urls[0]]


def _unused(path: Path) -> None:  # pragma: no cover
    del path
