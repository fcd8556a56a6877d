"""The store stays true across runs: records kept between runs and shared by concurrent runs,
files trusted only when they are what fetcher wrote, a resume that never splices two
representations, reruns that read no finished file, and exit statuses from the records.

Real ``scrapy crawl fetch`` processes against the test origin, several at once on one store
where the test says so. Overlaps between processes are made certain with the origin's gates
(``hold=<name>``), never assumed from timing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Fetch
from tests.origin import Origin, content_bytes, expected_digest, parse_size

KiB, MiB = 1 << 10, 1 << 20
FIELDS = ("url", "status", "path", "size", "checksum", "algorithm", "http_status", "attempts",
          "error", "note", "run", "finished_at")
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
SUMMARY = re.compile(r"(\d+) downloaded, (\d+) up to date, (\d+) failed")
GATED = {"FETCHER_STALL_TIMEOUT": 60}  # a transfer held at an origin gate is not a stall


# -- helpers ----------------------------------------------------------------------------------


def manifest_lines(store: Path) -> list[dict[str, Any]]:
    """Every line of the manifest, each of which must be one whole JSON object."""
    records = []
    for n, line in enumerate((store / "manifest.jsonl").read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"manifest line {n} is not JSON: {line!r}")
        assert isinstance(record, dict), line
        records.append(record)
    return records


def one_per_url(store: Path) -> dict[str, dict[str, Any]]:
    """The manifest as url -> record, checking that it holds exactly one line per URL."""
    lines = manifest_lines(store)
    counts = Counter(r["url"] for r in lines)
    assert not [u for u, n in counts.items() if n > 1], [u for u, n in counts.items() if n > 1][:5]
    return {r["url"]: r for r in lines}


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def gen_name(url: str) -> tuple[str, int]:
    """(name, size) the origin generates for a /gen/<size>/<name>?... URL."""
    path = url.split("://", 1)[1].split("?", 1)[0]
    _, _, size, name = path.split("/", 3)
    return name, parse_size(size)


def gen_path(url: str) -> str:
    return "/" + url.split("://", 1)[1].split("?", 1)[0].split("/", 1)[1]


def assert_files_true(store: Path, records: dict[str, dict[str, Any]]) -> None:
    """Every recorded file is the origin's file, byte for byte."""
    for url, r in records.items():
        if r["status"] == "failed":
            continue
        name, size = gen_name(url)
        digest = expected_digest(name, size)
        assert r["checksum"] == digest and r["size"] == size, r
        assert file_digest(store / r["path"]) == digest, r


def gets(origin: Origin, path: str) -> list[dict[str, Any]]:
    return [r for r in origin.stats.snapshot().requests if r["path"] == path and r["method"] == "GET"]


def summary(log: str) -> tuple[int, int, int]:
    m = SUMMARY.search(log)
    assert m, log[-3000:]
    downloaded, uptodate, failed = (int(x) for x in m.groups())
    return downloaded, uptodate, failed


def entries(failed_txt: Path) -> list[str]:
    """The URL lines of a list (not comments, not indented options)."""
    return [line for line in failed_txt.read_text().splitlines() if line and line[0] not in "# \t"]


def recorded_urls(store: Path) -> set[str]:
    """URLs with a manifest line, read while other processes may be appending (a line being
    written may be cut: it is skipped here; the strict checks run once the writers are idle)."""
    try:
        text = (store / "manifest.jsonl").read_text()
    except FileNotFoundError:
        return set()
    urls = set()
    for line in text.splitlines():
        try:
            urls.add(json.loads(line)["url"])
        except (ValueError, KeyError, TypeError):
            pass
    return urls


def get_counts(origin: Origin) -> Counter[str]:
    """GET requests per path, from the origin's request log."""
    return Counter(r["path"] for r in origin.stats.snapshot().requests if r["method"] == "GET")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


class Crawl:
    """A ``scrapy crawl fetch`` running in the background, its log in a file."""

    def __init__(self, fetch: Fetch, list_name: str, settings: dict[str, Any] | None = None) -> None:
        self.log_path = fetch.cwd / f"{list_name}.{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(fetch.command("-a", f"list={list_name}", settings=settings),
                                     cwd=fetch.cwd, env=fetch.env(), stdout=subprocess.DEVNULL, stderr=self._log)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:  # never leave a crawl behind
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    @property
    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def crawls() -> Iterator[list[Crawl]]:
    started: list[Crawl] = []
    yield started
    for crawl in started:
        crawl.stop()


def write_list(fetch: Fetch, name: str, urls: list[str]) -> str:
    (fetch.cwd / name).write_text("".join(f"{u}\n" for u in urls))
    return name


def no_traceback(log: str) -> None:
    assert "Traceback" not in log, log[-3000:]


# -- 1. records survive ------------------------------------------------------------------------


def test_rerun_of_failed_txt_updates_those_records_and_keeps_the_rest(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    good = [f"{u}/gen/3k/keep{i}.bin" for i in range(5)]
    recovers = [f"{u}/gen/2k/recover{i}.bin?fail=503:1" for i in range(4)]  # fails once, then serves
    broken = [f"{u}/gen/1k/gone{i}.bin?fail=410:0" for i in range(2)]  # fails every time
    listing = "".join(f"{x}\n" for x in good + recovers[1:] + broken)
    listing += f"{recovers[0]}\n  out=named/recover0.bin\n"  # its option must survive in failed.txt
    first = fetch(listing, settings={"RETRY_TIMES": 0})
    assert first.returncode == 1, first.log
    before = one_per_url(first.store)
    assert len(before) == 11
    assert {u for u, r in before.items() if r["status"] == "downloaded"} == set(good)
    assert {u for u, r in before.items() if r["status"] == "failed"} == set(recovers + broken)
    for r in before.values():
        assert set(FIELDS) <= set(r), r
        assert r["run"] and ISO_UTC.fullmatch(r["finished_at"]), r
    failed_txt = first.store / "failed.txt"
    assert stat.S_IMODE(failed_txt.stat().st_mode) == 0o600
    assert sorted(entries(failed_txt)) == sorted(recovers + broken)
    assert re.search(rf"^{re.escape(recovers[0])}\n[ \t]+out=named/recover0\.bin$", failed_txt.read_text(), re.MULTILINE)

    rerun = fetch(None, "-a", "list=downloads/failed.txt", settings={"RETRY_TIMES": 0})
    assert rerun.returncode == 1, rerun.log  # the two broken ones fail again
    after = one_per_url(rerun.store)
    assert len(after) == 11
    for url in good:
        assert after[url] == before[url]  # untouched: same run, same finished_at
    for url in recovers:
        assert after[url]["status"] == "downloaded" and after[url]["run"] != before[url]["run"]
    for url in broken:
        assert after[url]["status"] == "failed" and after[url]["run"] not in (None, before[url]["run"])
    assert len({r["run"] for r in after.values()}) == 2
    assert after[recovers[0]]["path"] == "named/recover0.bin"
    assert_files_true(rerun.store, after)
    assert stat.S_IMODE(failed_txt.stat().st_mode) == 0o600
    assert sorted(entries(failed_txt)) == sorted(broken)  # rewritten from the store's records
    for url in good:
        assert origin.stats.hits_by_path[gen_path(url)] == 1  # the rerun did not touch them


# -- 2. concurrent runs on one store ------------------------------------------------------------


def _concurrent(fetch: Fetch, origin: Origin, crawls: list[Crawl], lists: list[list[str]], gated: str,
                settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Run one crawl per list on one store. ``gated`` (first in every list) is held at the
    origin while the first crawl writes it, until every crawl has recorded all its other URLs:
    the others then have to wait for the first one's file. Returns the final records."""
    gate = gated.split("hold=")[1].split("&")[0]
    names = [write_list(fetch, f"list{i}.txt", urls) for i, urls in enumerate(lists)]
    crawls.append(Crawl(fetch, names[0], settings))
    wait_for(lambda: origin.stats.hits_by_path[gen_path(gated)] >= 1, "the first crawl to start the gated file")
    crawls.extend(Crawl(fetch, name, settings) for name in names[1:])
    manifest = fetch.cwd / "downloads/manifest.jsonl"
    # No crawl can end while the gated file is held, so each appends one line per URL it finished.
    expected_lines = sum(len(urls) - 1 for urls in lists)

    def everything_else_recorded() -> bool:
        if any(c.proc.poll() is not None for c in crawls):
            pytest.fail("a crawl ended while the gated file was held:\n" + "\n".join(c.log[-2000:] for c in crawls))
        return manifest.exists() and manifest.read_text().count("\n") >= expected_lines  # whole lines

    wait_for(everything_else_recorded, "every crawl to record all but the gated file")
    lines = manifest_lines(fetch.cwd / "downloads")  # appended by several processes at once: each line whole
    assert len(lines) == expected_lines and gated not in {r["url"] for r in lines}
    origin.release(gate)
    codes = [c.wait() for c in crawls]
    assert codes == [0] * len(crawls), "\n".join(c.log[-3000:] for c in crawls)

    union = {u for urls in lists for u in urls}
    records = one_per_url(fetch.cwd / "downloads")
    assert set(records) == union
    assert {r["status"] for r in records.values()} <= {"downloaded", "uptodate"}
    assert_files_true(fetch.cwd / "downloads", records)
    # Each file was downloaded once, by one crawl; every other crawl that listed it found it up to date.
    counts = [summary(c.log) for c in crawls]
    assert sum(d for d, _, _ in counts) == len(union), counts
    assert sum(t for _, t, _ in counts) == sum(len(urls) for urls in lists) - len(union), counts
    stats, got = origin.stats.snapshot(), get_counts(origin)
    for url in union:
        path = gen_path(url)
        assert got[path] == 1, (url, gets(origin, path))
        assert stats.bytes_by_path[path] == gen_name(url)[1], url  # sent in full once, never twice
    return records


def test_two_concurrent_runs_share_one_store(fetch: Fetch, origin: Origin, crawls: list[Crawl]) -> None:
    u, tag = origin.url, uuid.uuid4().hex[:6]
    gated = f"{u}/gen/512k/two-gated.bin?hold=two{tag}&hold_at=65536"
    slow = [f"{u}/gen/256k/two-slow{i}.bin?rate=262144" for i in range(8)]  # a second each: transfers overlap
    shared = [f"{u}/gen/4k/two-shared{i}.bin" for i in range(91)]
    lists = [[gated, *slow, *shared, *(f"{u}/gen/4k/two-{n}{i}.bin" for i in range(200))] for n in "ab"]
    assert all(len(x) == 300 for x in lists)
    records = _concurrent(fetch, origin, crawls, lists, gated, GATED)
    assert records[gated]["status"] == "uptodate"  # the waiting crawl recorded it last, as up to date


def test_four_concurrent_runs_share_one_store(fetch: Fetch, origin: Origin, crawls: list[Crawl]) -> None:
    u, tag = origin.url, uuid.uuid4().hex[:6]
    gated = f"{u}/gen/512k/four-gated.bin?hold=four{tag}&hold_at=65536"
    slow = [f"{u}/gen/256k/four-slow{i}.bin?rate=262144" for i in range(6)]
    common = [f"{u}/gen/4k/four-common{i}.bin" for i in range(43)]

    def own(n: str, count: int) -> list[str]:
        return [f"{u}/gen/4k/four-{n}{i}.bin" for i in range(count)]

    pair = own("pair", 50)  # in the second and third lists only
    first = [gated, *slow, *common, *own("a", 250)]
    lists = [
        first,
        [gated, *slow, *common, *pair, *own("b", 200)],
        [gated, *slow, *common, *pair, *own("c", 200)],
        first,  # the same list twice at once
    ]
    assert all(len(x) == 300 for x in lists)
    _concurrent(fetch, origin, crawls, lists, gated, GATED)


def test_a_run_killed_mid_run_loses_nothing(fetch: Fetch, origin: Origin, crawls: list[Crawl]) -> None:
    u, tag = origin.url, uuid.uuid4().hex[:6]
    gated = f"{u}/gen/{MiB}/kill-gated.bin?hold=kill{tag}&hold_at={256 * KiB}"
    slow = [f"{u}/gen/{4 * MiB}/kill-slow{i}.bin?rate={MiB}" for i in range(3)]
    k_only = [f"{u}/gen/4k/kill-k{i}.bin" for i in range(96)]
    k_a = [f"{u}/gen/4k/kill-ka{i}.bin" for i in range(100)]
    a_b = [f"{u}/gen/4k/kill-ab{i}.bin" for i in range(50)]
    killed = [gated, *slow, *k_a, *k_only]
    others = [[gated, *k_a, *a_b, *(f"{u}/gen/4k/kill-a{i}.bin" for i in range(49))],
              [gated, *a_b, *(f"{u}/gen/4k/kill-b{i}.bin" for i in range(149))]]
    names = [write_list(fetch, "killed.txt", killed),
             *(write_list(fetch, f"other{i}.txt", x) for i, x in enumerate(others))]
    store = fetch.cwd / "downloads"
    victim = Crawl(fetch, names[0], GATED)
    crawls.append(victim)
    wait_for(lambda: origin.stats.hits_by_path[gen_path(gated)] >= 1, "the crawl to start the gated file")
    survivors = [Crawl(fetch, name, GATED) for name in names[1:]]
    crawls.extend(survivors)
    almost_all = set(k_only) | {x for urls in others for x in urls} - {gated}

    wait_for(lambda: almost_all <= recorded_urls(store), "everything but the gated and slow files to be recorded")
    victim.proc.send_signal(signal.SIGKILL)
    victim.wait()
    # What the killed crawl left: whole lines only, and every file they record is true.
    lines = manifest_lines(store)
    assert_files_true(store, {r["url"]: r for r in lines})
    assert set(k_only) <= {r["url"] for r in lines}
    origin.release(f"kill{tag}")
    codes = [c.wait() for c in survivors]
    assert codes == [0, 0], "\n".join(c.log[-3000:] for c in survivors)

    rerun = fetch(None, "-a", f"list={names[0]}", settings=GATED)
    assert rerun.returncode == 0, rerun.log
    union = set(killed) | {x for urls in others for x in urls}
    records = one_per_url(store)
    assert set(records) == union
    assert {r["status"] for r in records.values()} <= {"downloaded", "uptodate"}
    assert_files_true(store, records)
    assert not list(store.rglob("*.part*"))
    stats = origin.stats.snapshot()
    for url in union:
        size = gen_name(url)[1]
        assert stats.bytes_by_path[gen_path(url)] < 2 * size, url  # a killed transfer is not sent twice in full
    print("after the kill:", {gen_name(x)[0]: [(r["status"], r["headers"].get("range")) for r in gets(origin, gen_path(x))]
                              for x in [gated, *slow]})


# -- 3. uptodate only when it is what fetcher wrote --------------------------------------------


def test_damaged_files_are_fetched_again_and_say_why(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    names = ["truncated", "overwritten", "replaced", "intact", "sneaky"]
    urls = {n: f"{u}/gen/64k/dmg-{n}.bin" for n in names}
    listing = "".join(f"{x}\n" for x in urls.values())
    first = fetch(listing)
    assert first.returncode == 0, first.log
    recorded = one_per_url(first.store)
    files = {n: first.store / recorded[urls[n]]["path"] for n in names}
    garbage = b"\xa5" * (64 * KiB)

    with files["truncated"].open("r+b") as f:
        f.truncate(1000)
    files["overwritten"].write_bytes(garbage)  # same size, new bytes: the mtime moves
    os.utime(files["overwritten"], ns=(time.time_ns(), files["overwritten"].stat().st_mtime_ns + 10**9))
    tmp = files["replaced"].with_name("replacement.tmp")
    tmp.write_bytes(b"another tool's file\n" * 100)
    os.replace(tmp, files["replaced"])
    origin.reset_stats()
    second = fetch(listing)
    assert second.returncode == 0, second.log
    records = one_per_url(second.store)
    for n in ("truncated", "overwritten", "replaced"):
        r = records[urls[n]]
        assert r["status"] == "downloaded", r
        assert r["note"], r  # the note says why
        assert len(gets(origin, gen_path(urls[n]))) == 1
    assert "1000" in records[urls["truncated"]]["note"]  # the size it found
    assert records[urls["intact"]]["status"] == "uptodate"
    assert origin.stats.hits_by_path[gen_path(urls["intact"])] == 0
    assert_files_true(second.store, records)

    # Same size, same mtime, other bytes: no stat can tell; FETCHER_VERIFY=full re-hashes and can.
    st = files["sneaky"].stat()
    files["sneaky"].write_bytes(garbage)
    os.utime(files["sneaky"], ns=(st.st_atime_ns, st.st_mtime_ns))
    origin.reset_stats()
    third = fetch(listing, settings={"FETCHER_VERIFY": "full"})
    assert third.returncode == 0, third.log
    records = one_per_url(third.store)
    assert records[urls["sneaky"]]["status"] == "downloaded" and records[urls["sneaky"]]["note"]
    for n in ("truncated", "overwritten", "replaced", "intact"):
        assert records[urls[n]]["status"] == "uptodate", records[urls[n]]
    assert origin.stats.bytes_sent == 64 * KiB  # only the sneaky file's body
    assert_files_true(third.store, records)


def test_revalidation_refetches_a_damaged_file_regardless(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    intact, damaged, changed = (f"{u}/gen/64k/reval-{n}.bin" for n in ("intact", "damaged", "changed"))
    listing = f"{intact}\n{damaged}\n{changed}\n"
    first = fetch(listing)
    assert first.returncode == 0, first.log
    path = first.store / first.record(damaged)["path"]
    with path.open("r+b") as f:
        f.truncate(10 * KiB)
    origin.versions[gen_path(changed)] = 2
    origin.reset_stats()
    try:
        second = fetch(listing, settings={"FETCHER_REVALIDATE": True})
    finally:
        origin.versions.pop(gen_path(changed))
    assert second.returncode == 0, second.log
    [asked] = gets(origin, gen_path(intact))
    assert asked["headers"].get("if-none-match") or asked["headers"].get("if-modified-since")
    assert asked["status"] == 304 and second.record(intact)["status"] == "uptodate"
    [refetched] = gets(origin, gen_path(damaged))
    assert refetched["status"] == 200 and refetched["body_bytes"] == 64 * KiB
    record = second.record(damaged)
    assert record["status"] == "downloaded" and record["note"]
    assert file_digest(path) == expected_digest("reval-damaged.bin", 64 * KiB)
    record = second.record(changed)
    assert record["status"] == "downloaded"
    assert record["checksum"] == expected_digest("reval-changed.bin", 64 * KiB, version=2)


def test_a_file_with_no_record_is_checked_before_it_is_trusted(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    size = 16 * KiB
    right = {n: content_bytes(f"foreign-{n}.bin", size) for n in ("sum", "head", "old")}
    cases = {
        # name: (bytes put at the final name by another tool, list options, expected status)
        "sum": (right["sum"], f"sha256={expected_digest('foreign-sum.bin', size)}", "uptodate"),
        "badsum": (b"\x00" * size, f"sha256={expected_digest('foreign-badsum.bin', size)}", "downloaded"),
        "head": (right["head"], "", "uptodate"),
        "garbage": (b"garbage!", "", "downloaded"),
        "old": (right["old"], "", "downloaded"),  # older than the server's Last-Modified
    }
    store = fetch.cwd / "downloads"
    store.mkdir()
    listing = ""
    for name, (data, options, _) in cases.items():
        (store / f"foreign-{name}.bin").write_bytes(data)
        listing += f"{u}/gen/{size}/foreign-{name}.bin\n  out=foreign-{name}.bin\n" + (f"  {options}\n" if options else "")
    os.utime(store / "foreign-old.bin", (time.time(), 1_500_000_000))  # 2017: the origin's file is from 2024
    run = fetch(listing)
    assert run.returncode == 0, run.log
    stats = origin.stats.snapshot()
    for name, (_, _, status) in cases.items():
        url, path = f"{u}/gen/{size}/foreign-{name}.bin", f"/gen/{size}/foreign-{name}.bin"
        record = run.record(url)
        assert record["status"] == status, record
        if status == "downloaded":
            assert record["note"], record  # why it was not trusted
        assert (store / f"foreign-{name}.bin").read_bytes() == content_bytes(f"foreign-{name}.bin", size)
        if status == "uptodate":
            assert stats.bytes_by_path[path] == 0, name  # trusted without its body
        else:
            assert stats.bytes_by_path[path] == size, name
    assert stats.hits_by_path[f"/gen/{size}/foreign-sum.bin"] == 0  # the list's checksum was enough
    assert [r["method"] for r in stats.requests if r["path"] == f"/gen/{size}/foreign-head.bin"] == ["HEAD"]

    origin.reset_stats()
    again = fetch(listing)
    assert again.returncode == 0, again.log
    assert {r["status"] for r in again.manifest} == {"uptodate"}
    assert origin.stats.hits == 0  # now they have records: nothing to ask


# -- 4. a store from the previous version -------------------------------------------------------


def test_a_store_of_the_previous_version_is_imported_once(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    size = 32 * KiB
    store = fetch.cwd / "downloads"
    store.mkdir()
    names = ("good", "corrupt", "missing")
    urls = {n: f"{u}/gen/{size}/legacy-{n}.bin" for n in names}
    old_failed = f"{u}/gen/1k/legacy-failed.bin"
    legacy = []
    for n in names:
        digest = expected_digest(f"legacy-{n}.bin", size)
        legacy.append({"url": urls[n], "status": "downloaded", "path": f"legacy/{n}.bin", "size": size,
                       "checksum": digest, "algorithm": "sha256", "http_status": 200, "attempts": 1, "error": None})
    legacy.append({"url": old_failed, "status": "failed", "path": None, "size": None, "checksum": None,
                   "algorithm": "sha256", "http_status": 404, "attempts": 1, "error": "HTTP 404"})
    (store / "legacy").mkdir()
    (store / "legacy/good.bin").write_bytes(content_bytes("legacy-good.bin", size))
    (store / "legacy/corrupt.bin").write_bytes(b"\x01" * size)  # right size, wrong bytes
    (store / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in legacy))
    listing = "".join(f"{urls[n]}\n  out=legacy/{n}.bin\n" for n in names)
    run = fetch(listing)
    assert run.returncode == 0, run.log  # this list's URLs all ended well
    assert (store / ".fetcher/index.sqlite").exists()
    records = one_per_url(store)
    assert set(records) == {*urls.values(), old_failed}
    assert all(r["run"] for r in records.values()), records
    assert records[urls["good"]]["status"] == "uptodate"
    assert origin.stats.bytes_by_path[gen_path(urls["good"])] == 0  # trusted: it matches its checksum
    for n in ("corrupt", "missing"):
        assert records[urls[n]]["status"] == "downloaded", records[urls[n]]
    assert records[old_failed]["status"] == "failed"
    assert entries(store / "failed.txt") == [old_failed]  # the store's failures, not only this run's
    assert_files_true(store, {x: records[x] for x in urls.values()})

    origin.reset_stats()
    again = fetch(listing)
    assert again.returncode == 0, again.log
    assert [again.record(x)["status"] for x in urls.values()] == ["uptodate"] * 3
    assert origin.stats.bytes_sent == 0


# -- 5. a resume never splices two representations ----------------------------------------------


def test_a_resumed_part_of_another_length_is_never_spliced(fetch: Fetch, origin: Origin) -> None:
    """The first response (5000 bytes) drops at byte 1000; the retry's 206 has the same ETag
    but says the file is 9000 bytes: the kept 1000 bytes belong to another representation."""
    url = f"{origin.url}/gen/5000/splice.bin?drop_at=1000&range_size=9000"
    run = fetch(f"{url}\n")
    assert run.returncode == 0, run.log
    record = run.record(url)
    assert record["size"] == 5000 and record["checksum"] == expected_digest("splice.bin", 5000)
    assert (run.store / record["path"]).read_bytes() == content_bytes("splice.bin", 5000)
    requests = gets(origin, "/gen/5000/splice.bin")
    assert [r["status"] for r in requests][:2] == [200, 206]  # it did try to resume
    last = requests[-1]
    assert last["status"] == 200 and "range" not in last["headers"] and last["body_bytes"] == 5000


def test_a_part_from_an_earlier_run_of_another_length_is_never_spliced(fetch: Fetch, origin: Origin) -> None:
    url = f"{origin.url}/gen/5000/splice2.bin?drop_at=1000&range_size=9000"
    first = fetch(f"{url}\n", settings={"RETRY_TIMES": 0})
    assert first.returncode == 1 and list(first.store.rglob("*.part"))  # 1000 bytes kept for later
    second = fetch(f"{url}\n")
    assert second.returncode == 0, second.log
    record = second.record(url)
    assert record["size"] == 5000 and record["checksum"] == expected_digest("splice2.bin", 5000)
    assert (second.store / record["path"]).read_bytes() == content_bytes("splice2.bin", 5000)
    assert gets(origin, "/gen/5000/splice2.bin")[-1]["status"] == 200


# -- 6. cheap reruns ------------------------------------------------------------------------------

# Runs the crawl as a child: the bytes its process read (rchar of /proc/<pid>/io, which Linux
# adds to the parent's counters when the child is reaped, so nothing read just before exit is missed).
MEASURE_READS = """
import subprocess, sys
def rchar():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])
before = rchar()
code = subprocess.call(sys.argv[1:], stderr=subprocess.DEVNULL)
print(rchar() - before, code)
"""


def read_volume(fetch: Fetch, list_name: str) -> int:
    """Bytes a run reads from disk, in one process (each worker process would read Python and
    Scrapy again: that says nothing about the store)."""
    command = fetch.command("-a", f"list={list_name}", settings={"FETCHER_WORKERS": 1})
    proc = subprocess.run([sys.executable, "-c", MEASURE_READS, *command],
                          cwd=fetch.cwd, env=fetch.env(), capture_output=True, text=True, timeout=600, check=False)
    read, code = (int(x) for x in proc.stdout.split())
    assert code == 0, proc.stderr[-3000:]
    return read


def assert_rerun_reads_no_file(fetch: Fetch, count: int) -> None:
    store = fetch.cwd / "downloads"
    files = [r["path"] for r in manifest_lines(store)]
    assert len(files) == count
    store_bytes = sum((store / p).stat().st_size for p in files)
    (fetch.cwd / "empty.txt").write_text("")
    started = time.monotonic()
    rerun = read_volume(fetch, "urls.txt")
    took = time.monotonic() - started
    baseline = read_volume(fetch, "empty.txt")  # Python, Scrapy, the store's index: what any run reads
    assert {r["status"] for r in manifest_lines(store)} == {"uptodate"}
    extra = rerun - baseline
    print(f"rerun of {count} files ({store_bytes / MiB:.0f} MiB) in {took:.1f} s read {rerun / MiB:.2f} MiB, "
          f"an empty list {baseline / MiB:.2f} MiB: {extra / MiB:.2f} MiB more, {100 * extra / store_bytes:.2f}%")
    assert extra < store_bytes / 100


def test_a_rerun_reads_no_finished_file(fetch: Fetch, origin: Origin) -> None:
    count = 2000
    origin.record_requests = False
    try:
        (fetch.cwd / "urls.txt").write_text("".join(f"{origin.url}/gen/64k/cheap{i}.bin\n" for i in range(count)))
        first = fetch(None, "-a", "list=urls.txt", timeout=300)
    finally:
        origin.record_requests = True
    assert first.returncode == 0, first.log
    assert_rerun_reads_no_file(fetch, count)


@pytest.mark.slow
def test_a_rerun_of_20000_files_reads_no_finished_file(fetch: Fetch, origin: Origin) -> None:
    """20,000 files of 64 KiB (1.25 GiB). Fetching them takes minutes here, so the store is
    written as the previous version would have left it and imported by a run of an empty list
    (which hashes every file once); the run of the whole list after it is the measured rerun."""
    count, size = 20_000, 64 * KiB
    store = fetch.cwd / "downloads"
    (store / "files").mkdir(parents=True)
    lines, listing = [], []
    for i in range(count):
        name = f"bulk{i}.bin"
        data = content_bytes(name, size)
        (store / "files" / name).write_bytes(data)
        url = f"{origin.url}/gen/64k/{name}"
        listing.append(f"{url}\n  out=files/{name}\n")
        lines.append(json.dumps({"url": url, "status": "downloaded", "path": f"files/{name}", "size": size,
                                 "checksum": hashlib.sha256(data).hexdigest(), "algorithm": "sha256",
                                 "http_status": 200, "attempts": 1, "error": None}) + "\n")
    (store / "manifest.jsonl").write_text("".join(lines))
    (fetch.cwd / "urls.txt").write_text("".join(listing))
    (fetch.cwd / "empty.txt").write_text("")
    imported = fetch(None, "-a", "list=empty.txt", timeout=600)
    assert imported.returncode == 0, imported.log
    assert len(imported.manifest) == count and (store / ".fetcher/index.sqlite").exists()
    assert_rerun_reads_no_file(fetch, count)
    assert origin.stats.hits == 0  # every file was trusted from its imported record


# -- 7. exit status from the records ---------------------------------------------------------------

NO_SUMMARY = {"EXTENSIONS": json.dumps({"fetcher.extensions.Summary": None})}


@pytest.mark.parametrize("settings", [{}, NO_SUMMARY], ids=["summary", "no-summary"])
def test_exit_status_comes_from_the_records(fetch: Fetch, origin: Origin, settings: dict[str, Any]) -> None:
    u = origin.url
    good = [f"{u}/gen/1k/exit-good.bin", f"{u}/gen/1k/exit-good2.bin"]
    failing = fetch("".join(f"{x}\n" for x in good) + f"{u}/status/404\n", settings=settings)
    assert failing.returncode == 1, failing.log
    assert ("fetcher summary" in failing.log) == (not settings)  # the setting took effect
    assert [failing.record(x)["status"] for x in good] == ["downloaded"] * 2
    # The store still holds the 404's failure, but every URL of this list ends well.
    ok = fetch("".join(f"{x}\n" for x in good) + f"{u}/gen/1k/exit-new.bin\n", settings=settings)
    assert ok.returncode == 0, ok.log
    assert [ok.record(x)["status"] for x in good] == ["uptodate"] * 2
    assert entries(ok.store / "failed.txt") == [f"{u}/status/404"]


# -- 8. a pipeline that cannot start stops the run ---------------------------------------------------


@pytest.mark.parametrize("setting", [{"FETCHER_VERIFY": "bogus"}, {"FETCHER_ALGORITHM": "nope"}],
                         ids=["verify", "algorithm"])
def test_a_pipeline_that_cannot_start_stops_the_run(fetch: Fetch, origin: Origin, setting: dict[str, str]) -> None:
    origin.texts["startup-list"] = f"{origin.url}/gen/1k/never.bin\n"
    run = fetch(None, "-a", f"list={origin.url}/text/startup-list", settings=setting)
    assert run.returncode != 0
    assert re.search(r"ERROR: Cannot start: .*" + re.escape(next(iter(setting))), run.log), run.log[-3000:]
    no_traceback(run.log)
    assert origin.stats.hits == 0  # neither the list nor any file was fetched
    assert not (run.store / "manifest.jsonl").exists()


def test_no_pipeline_is_a_clear_error(fetch: Fetch, origin: Origin) -> None:
    disabled = json.dumps({"fetcher.pipelines.StreamingFilesPipeline": None})  # the add-on adds it otherwise
    run = fetch(f"{origin.url}/gen/1k/nopipe.bin\n", settings={"ITEM_PIPELINES": disabled})
    assert run.returncode != 0
    assert re.search(r"ERROR: .*ITEM_PIPELINES", run.log), run.log[-3000:]
    no_traceback(run.log)
    assert origin.stats.hits == 0


def _manifest_urls(path: Path) -> list[str]:
    return [json.loads(line)["url"] for line in path.read_text().splitlines()]


def test_replacing_records_flags_the_manifest_for_compaction(tmp_path: Path) -> None:
    """A new URL's record is one statement, a replacement a transaction that flags the
    manifest: a run killed before compacting leaves the flag for the next run."""
    import sqlite3

    from fetcher.store.records import INDEX_NAME, RecordStore, StoredRecord

    state, manifest = tmp_path / "state", tmp_path / "manifest.jsonl"
    store = RecordStore.open(state, manifest, tmp_path / "failed.txt")
    store.compact()  # a new store's first compaction (the flag its schema sets)
    store.put(StoredRecord("http://h/a", "downloaded", path="a", size=1))
    store.put(StoredRecord("http://h/b", "failed", error="HTTP 404"))
    assert store.superseded == 0
    flagged = "SELECT value FROM meta WHERE key = 'superseded'"
    with sqlite3.connect(state / INDEX_NAME) as db:
        assert db.execute(flagged).fetchone() is None
    store.put(StoredRecord("http://h/a", "uptodate", path="a", size=1), durable=False)
    store.put(StoredRecord("http://h/c", "uptodate", path="c", size=1), durable=False)
    store.put(StoredRecord("http://h/b", "downloaded", path="b", size=2))  # flushes the batch with it
    assert store.superseded == 2
    with sqlite3.connect(state / INDEX_NAME) as db:  # what a killed run leaves: the flag is committed
        assert db.execute(flagged).fetchone() == ("1",)
        assert db.execute("SELECT url, status FROM records ORDER BY url").fetchall() == [
            ("http://h/a", "uptodate"), ("http://h/b", "downloaded"), ("http://h/c", "uptodate")]
    assert _manifest_urls(manifest) == ["http://h/a", "http://h/b", "http://h/a", "http://h/c", "http://h/b"]
    store.compact()
    assert sorted(_manifest_urls(manifest)) == ["http://h/a", "http://h/b", "http://h/c"]
    store.close()


def test_appends_follow_a_manifest_another_process_replaced(tmp_path: Path) -> None:
    """A compaction by another process replaces the manifest: the next line goes to the new file."""
    from fetcher.store.records import RecordStore, StoredRecord

    manifest = tmp_path / "manifest.jsonl"
    store = RecordStore.open(tmp_path / "state", manifest, tmp_path / "failed.txt")
    store.put(StoredRecord("http://h/a", "failed", error="x"))
    replacement = tmp_path / "manifest.new"
    replacement.write_text(manifest.read_text())
    os.replace(replacement, manifest)
    store.put(StoredRecord("http://h/b", "failed", error="x"))
    assert _manifest_urls(manifest) == ["http://h/a", "http://h/b"]
    manifest.unlink()  # removed by hand: made again
    store.put(StoredRecord("http://h/c", "failed", error="x"))
    store.close()
    assert _manifest_urls(manifest) == ["http://h/c"]


def _open_records(stores: list[str], ready: Any, results: Any) -> None:
    """In a child process: open each of *stores*' records once every opener is ready for it,
    say how it went."""
    from fetcher.store.records import RecordStore

    for store in stores:
        root = Path(store)
        ready.wait()
        try:
            RecordStore.open(root / ".fetcher", root / "manifest.jsonl", root / "failed.txt", root).close()
            results.put((store, "ok"))
        except Exception as exc:  # noqa: BLE001 - the reason is the test's message
            results.put((store, repr(exc)))


def test_processes_opening_a_new_store_at_once_all_get_its_records(tmp_path: Path) -> None:
    """Four processes opening the records of a store none has made yet, at the same moment, all
    succeed (ten new stores in turn). Turning the new index to WAL outside the store's lock
    failed one of them with "database is locked" in 24 of 60 such rounds (and a CI run once:
    two runs into a new store)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no copy of this process's threads and locks
    stores = [str(tmp_path / f"store{i}") for i in range(10)]
    ready, results = context.Barrier(4), context.Queue()
    openers = [context.Process(target=_open_records, args=(stores, ready, results)) for _ in range(4)]
    for opener in openers:
        opener.start()
    outcomes = Counter(results.get(timeout=60) for _ in range(4 * len(stores)))
    for opener in openers:
        opener.join(10)
    assert outcomes == Counter({(store, "ok"): 4 for store in stores}), outcomes
