"""The streaming downloader end to end: real `scrapy crawl fetch` runs against the test origin."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import textwrap
import time
from pathlib import Path

from tests.conftest import Fetch
from tests.origin import Origin, content_bytes, expected_digest

MiB = 1024 * 1024


def digest(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def test_mixed_list_downloads_everything_then_skips_it(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    big = 48 * MiB
    listing = textwrap.dedent(f"""\
        # comments and blank lines are ignored

        {u}/gen/10k/small/a.bin
        {u}/gen/{big}/big/b.iso   out=isos/b.iso   sha256={expected_digest("big/b.iso", big)}
        {u}/gen/3m/c.iso
          out=c.iso
          checksum=sha-256={expected_digest("c.iso", 3 * MiB)}
        {u}/gen/1k/d.bin  md5={expected_digest("d.bin", 1024, algorithm="md5")}
        {u}/gen/0/empty.txt
        """)
    run = fetch(listing)
    assert run.returncode == 0, run.log
    host = u.removeprefix("http://")
    expected = {
        f"{host}/gen/10k/small/a.bin": ("small/a.bin", 10 * 1024),
        "isos/b.iso": ("big/b.iso", big),
        "c.iso": ("c.iso", 3 * MiB),
        f"{host}/gen/1k/d.bin": ("d.bin", 1024),
        f"{host}/gen/0/empty.txt": ("empty.txt", 0),
    }
    for rel, (name, size) in expected.items():
        path = run.store / rel
        assert path.stat().st_size == size, rel
        assert digest(path) == expected_digest(name, size), rel
    assert not list(run.store.rglob("*.part*"))

    records = {r["path"]: r for r in run.manifest}
    assert set(records) == set(expected)
    for rel, (name, size) in expected.items():
        r = records[rel]
        assert r["status"] == "downloaded" and r["error"] is None
        assert r["size"] == size and r["algorithm"] == "sha256"
        assert r["checksum"] == expected_digest(name, size)
        assert r["http_status"] == 200 and r["attempts"] == 1
    assert "fetcher summary: 5 URLs" in run.log and "5 downloaded, 0 up to date, 0 failed" in run.log

    origin.reset_stats()
    again = fetch(listing)
    assert again.returncode == 0, again.log
    assert {r["status"] for r in again.manifest} == {"uptodate"}
    assert {r["checksum"] for r in again.manifest} == {r["checksum"] for r in records.values()}
    assert origin.stats.bytes_sent == 0  # no body fetched again
    assert "0 downloaded, 5 up to date, 0 failed" in again.log


def test_bad_lines_and_checksum_mismatch_fail_alone(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    listing = textwrap.dedent(f"""\
        {u}/gen/2k/good.bin
        not a url
        {u}/gen/2k/opt.bin  colour=blue
        ftp://127.0.0.1/file.bin
        {u}/gen/2k/wrong.bin  sha256={"0" * 64}
        {u}/gen/2k/good.bin
        """)
    run = fetch(listing)
    assert run.returncode == 1
    host = u.removeprefix("http://")
    good = run.store / host / "gen/2k/good.bin"
    assert good.read_bytes() == content_bytes("good.bin", 2048)
    assert origin.stats.hits_by_path["/gen/2k/good.bin"] == 1  # the duplicate was not fetched again
    assert not (run.store / host / "gen/2k/wrong.bin").exists()  # wrong bytes never at the final name
    assert not list(run.store.rglob("*.part*"))

    failed = [r for r in run.manifest if r["status"] == "failed"]
    assert len(failed) == 3 and len(run.manifest) == 5
    errors = " | ".join(r["error"] for r in failed)
    assert "line 2: not a valid http(s) URL" in errors
    assert "line 4: unsupported scheme 'ftp'" in errors
    # An option fetcher does not know is a warning (as in aria2c): the URL is still downloaded.
    assert run.record(f"{u}/gen/2k/opt.bin")["status"] == "downloaded"
    assert re.search(r"WARNING: line 3: .*colour", run.log)
    wrong = run.record(f"{u}/gen/2k/wrong.bin")
    assert wrong["error"].startswith("checksum mismatch") and wrong["path"] is None  # no file
    assert "line 6: duplicate" in run.log
    entries = [line for line in (run.store / "failed.txt").read_text().splitlines() if not line.startswith("#")]
    # aria2c's syntax (options indented below the URL); bad lines stay comments.
    assert entries == [f"{u}/gen/2k/wrong.bin", f"  checksum=sha-256={'0' * 64}"]


def test_inline_urls_and_standard_input(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    run = fetch(None, "-a", f"urls={u}/gen/1k/x1.bin {u}/gen/1k/x2.bin")
    assert run.returncode == 0, run.log
    assert {r["status"] for r in run.manifest} == {"downloaded"} and len(run.manifest) == 2

    run = fetch(None, "-a", "list=-", stdin=f"{u}/gen/1k/x3.bin\n  out=three.bin\n")
    assert run.returncode == 0, run.log
    assert (run.store / "three.bin").read_bytes() == content_bytes("x3.bin", 1024)


def test_list_fetched_over_http(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    origin.texts["remote-list"] = f"{u}/gen/5k/r1.bin\n{u}/gen/5k/r2.bin  out=r2.bin\n"
    run = fetch(None, "-a", f"list={u}/text/remote-list")
    assert run.returncode == 0, run.log
    assert (run.store / "r2.bin").read_bytes() == content_bytes("r2.bin", 5 * 1024)
    assert len(run.manifest) == 2

    missing = fetch(None, "-a", f"list={u}/text/no-such-list")
    assert missing.returncode == 1
    assert "cannot fetch the list" in missing.log and "HTTP 404" in missing.log


def test_missing_list_file_stops_before_anything(fetch: Fetch) -> None:
    run = fetch(None, "-a", "list=nowhere.txt")
    assert run.returncode != 0
    assert "list file nowhere.txt does not exist" in run.log
    assert not (run.store / "manifest.jsonl").exists()


def test_asyncio_only_mode_stops_before_anything(fetch: Fetch, origin: Origin) -> None:
    """Without Twisted's reactor Scrapy would put its own in-memory handler in place of fetcher's:
    the run refuses to start instead of holding bodies in memory."""
    run = fetch(f"{origin.url}/gen/1000/a.bin\n", settings={"TWISTED_REACTOR_ENABLED": False})
    assert run.returncode == 1, run.log[-4000:]
    assert "ERROR: Cannot start: " in run.log and "TWISTED_REACTOR_ENABLED=False" in run.log, run.log[-4000:]
    assert "Traceback" not in run.log
    assert origin.stats.hits == 0
    assert not list((fetch.cwd / "downloads").rglob("a.bin"))


def test_the_list_is_read_lazily(fetch: Fetch, origin: Origin) -> None:
    """Downloads start while the list is still being written: it is never read whole first."""
    u = origin.url
    proc = subprocess.Popen(
        fetch.command("-a", "list=-"), cwd=fetch.cwd, env=fetch.env(), stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(f"{u}/gen/1k/lazy1.bin\n{u}/gen/1k/lazy2.bin\n")
        proc.stdin.flush()
        first = fetch.cwd / "downloads" / u.removeprefix("http://") / "gen/1k/lazy1.bin"
        deadline = time.monotonic() + 30
        while not first.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.exists(), "nothing was downloaded before the list ended"
        proc.stdin.write(f"{u}/gen/1k/lazy3.bin\n")
        proc.stdin.close()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:  # never leave a hung crawl behind
            proc.kill()
    assert origin.stats.hits_by_path["/gen/1k/lazy3.bin"] == 1


def test_names_never_leave_the_store(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    listing = "\n".join([
        f"{u}/gen/1k/../../../escape1.bin",
        f"{u}/gen/1k/%2e%2e/%2E%2e/escape2.bin",
        f"{u}/gen/1k/a%2f..%2f..%2fescape3.bin",
        f"{u}/gen/1k/ok.bin  out=../escape4.bin",
        f"{u}/gen/1k/ok.bin  out=/tmp/escape5.bin",
    ]) + "\n"
    run = fetch(listing)
    store = run.store.resolve()
    # The three URLs are fetched (the names only look like escapes) and land inside the store.
    served_as = {1: "../../../escape1.bin", 2: "../../escape2.bin", 3: "a/../../escape3.bin"}  # origin's names
    for n, name in served_as.items():
        [record] = [r for r in run.manifest if r["url"].endswith(f"escape{n}.bin")]
        assert record["status"] == "downloaded", record
        path = (run.store / record["path"]).resolve()
        assert store in path.parents and path.read_bytes() == content_bytes(name, 1024), record
    written = [p for p in fetch.cwd.rglob("*") if p.is_file() and "escape" in p.name]
    assert len(written) == 3 and all(store in p.resolve().parents for p in written), written
    assert not Path("/tmp/escape5.bin").exists() and not (fetch.cwd / "escape4.bin").exists()
    # ok.bin is listed twice with an out= that would leave the store: both lines fail, with their reason;
    # its one current record is the last line's.
    assert re.search(r"line 4: out= must be a relative path .*escape4", run.log)
    assert re.search(r"line 5: out= must be a relative path .*escape5", run.log)
    [ok] = [r for r in run.manifest if r["url"] == f"{u}/gen/1k/ok.bin"]
    assert ok["status"] == "failed" and "escape5" in ok["error"]


def test_settings_layout_algorithm_and_manifest_location(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    run = fetch(
        f"{u}/gen/4k/h.tar.gz\n",
        settings={"FETCHER_LAYOUT": "hash", "FETCHER_ALGORITHM": "md5", "FETCHER_MANIFEST": "out/m.jsonl"},
    )
    assert run.returncode == 0, run.log
    [record] = [json.loads(line) for line in (fetch.cwd / "out/m.jsonl").read_text().splitlines()]
    sha1 = hashlib.sha1(f"{u}/gen/4k/h.tar.gz".encode()).hexdigest()
    assert record["path"] == f"full/{sha1}.gz"
    assert record["algorithm"] == "md5" and record["checksum"] == expected_digest("h.tar.gz", 4096, algorithm="md5")
    assert (run.store / record["path"]).read_bytes() == content_bytes("h.tar.gz", 4096)


def test_a_name_that_is_also_a_folder_keeps_both_files(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    host = u.removeprefix("http://")
    # /gen/1k/a first, then /gen/1k/a/b (a finished file moves to a/index.html), and the reverse for c.
    run = fetch(f"{u}/gen/1k/a\n{u}/gen/1k/c/d\n", settings={"CONCURRENT_REQUESTS": 1})
    assert run.returncode == 0, run.log
    again = fetch(f"{u}/gen/1k/a/b\n{u}/gen/1k/c\n{u}/gen/1k/a\n", settings={"CONCURRENT_REQUESTS": 1})
    assert again.returncode == 0, again.log
    store = run.store / host / "gen/1k"
    assert (store / "a/index.html").read_bytes() == content_bytes("a", 1024)
    assert (store / "a/b").read_bytes() == content_bytes("a/b", 1024)
    assert (store / "c/index.html").read_bytes() == content_bytes("c", 1024)
    assert (store / "c/d").read_bytes() == content_bytes("c/d", 1024)
    records = {r["url"].removeprefix(u): r for r in again.manifest}
    assert records["/gen/1k/a"]["path"] == f"{host}/gen/1k/a/index.html"
    assert records["/gen/1k/a"]["status"] == "uptodate"  # moved, not fetched again
    assert records["/gen/1k/c"]["path"] == f"{host}/gen/1k/c/index.html"
    assert origin.stats.hits_by_path["/gen/1k/a"] == 1


def test_fragments_and_query_names(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    host = u.removeprefix("http://")
    run = fetch(f"{u}/gen/1k/f.bin#one\n{u}/gen/1k/f.bin\n{u}/gen/1k/q.bin?x=1\n")
    assert run.returncode == 0, run.log
    assert origin.stats.hits_by_path["/gen/1k/f.bin"] == 1  # one file, not a path conflict
    assert (run.store / host / "gen/1k/q.bin?x=1").is_file()
    plain = fetch(f"{u}/gen/1k/r.bin?x=2\n", settings={"FETCHER_NAME_QUERY": "False"})
    assert plain.returncode == 0, plain.log
    assert (plain.store / host / "gen/1k/r.bin").read_bytes() == content_bytes("r.bin", 1024)


def test_gzip_aria2_list_with_mirrors_and_headers(fetch: Fetch, origin: Origin) -> None:
    """An aria2c input file, gzip-compressed: TAB-separated mirrors, indented options, an
    option fetcher does not implement (a warning), and one URL indented by mistake."""
    import gzip  # noqa: PLC0415

    u = origin.url
    listing = (
        f"{u}/status/503\t{u}/gen/8k/m.bin\n"
        "  out = mirrored/m.bin\n"
        "  header=X-Trace: one two\n"
        "  max-connection-per-server=4\n"
        f"{u}/gen/2k/plain.bin\n"
        f"  {u}/gen/2k/indented.bin\n"
    )
    (fetch.cwd / "urls.txt.gz").write_bytes(gzip.compress(listing.encode()))
    run = fetch(None, "-a", "list=urls.txt.gz", settings={"RETRY_TIMES": 1})
    assert run.returncode == 0, run.log
    assert (run.store / "mirrored/m.bin").read_bytes() == content_bytes("m.bin", 8 * 1024)
    record = run.record(f"{u}/status/503")
    assert record["mirror"] == f"{u}/gen/8k/m.bin" and record["path"] == "mirrored/m.bin"
    [served] = [r for r in origin.stats.snapshot().requests if r["path"] == "/gen/8k/m.bin"]
    assert served["headers"]["x-trace"] == "one two"
    assert run.record(f"{u}/gen/2k/indented.bin")["status"] == "downloaded"  # never silently dropped
    assert len(re.findall(r"WARNING: .*max-connection-per-server", run.log)) == 1


def test_an_unreachable_list_url_is_one_error(fetch: Fetch) -> None:
    run = fetch(None, "-a", "list=http://127.0.0.1:1/list.txt", settings={"RETRY_TIMES": 1})
    assert run.returncode == 1
    assert len(re.findall(r"\] ERROR: ", run.log)) == 1, run.log
    assert "cannot fetch the list http://127.0.0.1:1/list.txt: connection refused" in run.log


def test_a_list_packaged_with_fetcher(fetch: Fetch, origin: Origin) -> None:
    """-a list=package:NAME reads fetcher/lists/NAME as package data (how a Scrapyd egg ships a list)."""
    name = f"test-{time.monotonic_ns()}.txt"
    packaged = Path(__file__).resolve().parent.parent / "fetcher" / "lists" / name
    packaged.write_text(f"{origin.url}/gen/2k/packaged.bin\n  out=packaged.bin\n")
    try:
        run = fetch(None, "-a", f"list=package:{name}")
    finally:
        packaged.unlink()
    assert run.returncode == 0, run.log
    assert (run.store / "packaged.bin").read_bytes() == content_bytes("packaged.bin", 2048)
    missing = fetch(None, "-a", "list=package:no-such-list.txt")
    assert missing.returncode != 0 and "no list 'no-such-list.txt' is packaged" in missing.log
    assert not (missing.store / "manifest.jsonl").exists() or len(missing.manifest) == 1
