"""Hostile input against the store's promises: nothing lands outside the store or over its
records, nothing is written through a planted link, one URL's partial file never takes
another's finished file, and the records stay private and true."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
from pathlib import Path

from tests.conftest import Fetch
from tests.origin import Origin, content_bytes, expected_digest

RECORDS = ("manifest.jsonl", ".fetcher/index.sqlite", ".fetcher/files.lock", ".fetcher/manifest.lock", "failed.txt")


def host(origin: Origin) -> str:
    return origin.url.split("://")[1]


def test_out_and_dir_cannot_name_the_stores_own_files(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    first = fetch(f"{u}/gen/1k/before.bin\n{u}/status/404\n")  # a manifest, an index and a failed.txt to keep
    assert first.returncode == 1
    hostile = ["out=manifest.jsonl", "out=.fetcher/index.sqlite", "out=.fetcher/files.lock", "out=failed.txt",
               "dir=.fetcher/index.sqlite", "out=manifest.jsonl/x", "dir=.fetcher", "out=failed.txt.123.tmp"]
    lines = [f"{u}/gen/1k/h{i}.bin {option}" for i, option in enumerate(hostile)]
    run = fetch("\n".join([*lines, f"{u}/gen/2k/after.bin"]) + "\n")
    assert run.returncode == 1
    assert "Traceback" not in run.log, run.log[-3000:]
    for i in range(len(hostile)):
        record = run.record(f"{u}/gen/1k/h{i}.bin")
        assert record["status"] == "failed" and "the store's own" in record["error"], record
    assert run.record(f"{u}/gen/2k/after.bin")["status"] == "downloaded"
    assert run.record(f"{u}/gen/1k/before.bin")["status"] == "downloaded"  # the earlier record is intact
    assert sqlite3.connect(run.store / ".fetcher/index.sqlite").execute("SELECT count(*) FROM records").fetchone()
    assert (run.store / ".fetcher/index.sqlite").is_file()
    rerun = fetch(f"{u}/gen/1k/before.bin\n")  # the store still works
    assert rerun.returncode == 0, rerun.log[-3000:]
    assert rerun.record(f"{u}/gen/1k/before.bin")["status"] == "uptodate"


def test_an_index_that_cannot_be_opened_stops_the_run(fetch: Fetch, origin: Origin) -> None:
    index = fetch.cwd / "downloads/.fetcher/index.sqlite"
    index.parent.mkdir(parents=True)
    index.write_text("not a database")
    run = fetch(f"{origin.url}/gen/1k/never.bin\n")
    assert run.returncode == 1
    assert "Cannot start: " in run.log and "Traceback" not in run.log, run.log[-3000:]
    assert origin.stats.hits == 0


def test_a_run_whose_records_cannot_be_written_does_not_exit_0(fetch: Fetch, origin: Origin) -> None:
    assert fetch(f"{origin.url}/gen/1k/recorded.bin\n").returncode == 0
    (fetch.cwd / "downloads/manifest.jsonl").unlink()
    (fetch.cwd / "downloads/manifest.jsonl").mkdir()  # the manifest cannot be appended to any more
    url = f"{origin.url}/gen/1k/unrecorded.bin"
    run = fetch(f"{url}\n")
    assert run.returncode == 1, run.log[-3000:]
    assert "Cannot write the records" in run.log


def test_nothing_is_written_through_a_planted_link(fetch: Fetch, origin: Origin, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    folder = fetch.cwd / "downloads" / host(origin) / "gen/4k"
    folder.mkdir(parents=True)
    (folder / "victim.bin.part").symlink_to(outside)
    (folder / "meta.bin.part.meta").symlink_to(outside)
    url, meta_url = f"{origin.url}/gen/4k/victim.bin", f"{origin.url}/gen/4k/meta.bin"
    run = fetch(f"{url}\n{meta_url}\n")
    assert outside.read_text() == "keep me"
    record = run.record(url)
    assert record["status"] == "failed" and "symbolic link" in record["error"], record
    assert not (folder / "victim.bin").is_symlink()
    assert not (folder / "meta.bin").is_symlink()


def test_a_linked_manifest_is_not_appended_to(fetch: Fetch, origin: Origin, tmp_path: Path) -> None:
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    (fetch.cwd / "downloads").mkdir()
    (fetch.cwd / "downloads/manifest.jsonl").symlink_to(outside)
    run = fetch(f"{origin.url}/gen/1k/linked.bin\n")
    assert run.returncode == 1, run.log[-3000:]
    assert outside.read_text() == ""


def test_a_part_name_never_takes_another_urls_file(fetch: Fetch, origin: Origin) -> None:
    """/c/x's partial file is named like /c/x.part's file: in either order, one run after
    the other or both in one run, every file on disk is intact, and the first is kept."""
    u = origin.url
    files = {f"{u}/gen/3k/c/x": "c/x", f"{u}/gen/3k/c/x.part": "c/x.part"}
    store = fetch.cwd / "downloads" / host(origin) / "gen/3k"

    def intact() -> int:
        found = 0
        for name in files.values():
            on_disk = store / name
            if on_disk.is_file():
                assert on_disk.read_bytes() == content_bytes(name, 3 * 1024), name
                found += 1
        return found

    for first, second in (list(files), list(files)[::-1]):
        assert fetch(f"{first}\n").record(first)["status"] == "downloaded"
        run = fetch(f"{second}\n")
        assert (store / files[first]).is_file() and intact() >= 1, run.log[-3000:]
        assert run.record(second)["status"] in ("downloaded", "failed")
        fetch(f"{first}\n{second}\n")  # and both in one run
        assert (store / files[first]).is_file() and intact() >= 1
        shutil.rmtree(fetch.cwd / "downloads")


def test_an_imported_path_outside_the_store_is_ignored(fetch: Fetch, origin: Origin, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    store = fetch.cwd / "downloads"
    store.mkdir()
    line = {"url": f"{origin.url}/gen/1k/imp.bin", "status": "downloaded", "path": os.path.relpath(secret, store),
            "size": 7, "checksum": expected_digest("x", 1), "algorithm": "sha256"}
    (store / "manifest.jsonl").write_text(json.dumps(line) + "\n")
    run = fetch(f"{origin.url}/gen/1k/other.bin\n")
    assert run.returncode == 0, run.log[-3000:]
    assert "is not a file in the store" in run.log
    rows = sqlite3.connect(store / ".fetcher/index.sqlite").execute("SELECT path FROM records").fetchall()
    assert all(path is None or not path.startswith("..") for (path,) in rows), rows


def test_the_records_are_private(fetch: Fetch, origin: Origin) -> None:
    run = fetch(f"{origin.url}/gen/1k/private.bin\n{origin.url}/status/404\n")
    state = run.store / ".fetcher"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for path in state.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    assert stat.S_IMODE((run.store / "failed.txt").stat().st_mode) == 0o600
