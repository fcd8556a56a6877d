"""Hostile and damaged lists, end to end: real `scrapy crawl fetch`, `scrapy enqueue`, queue
workers and `scrapy queue` processes against a real redis-server and the test origin.

- a queue entry that is not UTF-8 (written by another client) is dead-lettered, not fatal;
- lines end at "\\n" only: U+2028, "\\x85" and a lone "\\r" inside a line keep it one line,
  in a list file, on standard input, and in a queue entry (enqueuer and worker agree);
- unknown options are warned about once per name, and only for a limited number of names;
- a 50 MB line (in a gzip list) and an entry of millions of option lines cost no memory.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import Fetch, measured
from tests.origin import Origin, expected_digest
from tests.redis_server import RedisServer
from tests.test_queue_workers import queue_state, scrapy

# Short leases and idle time, so that workers end within seconds of the queue draining.
QUEUE = {"FETCHER_QUEUE_LEASE": "2", "FETCHER_QUEUE_IDLE": "2", "FETCHER_PROGRESS": "log"}
RSS_LIMIT_MIB = 200
LONG_LINE_LIMIT = 100 * 1024  # no line of a log or failed.txt may be longer than this

@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def worker(fetch: Fetch, queue_url: str, store: Path, **settings: str) -> subprocess.Popen[bytes]:
    cmd = fetch.command("-a", f"list={queue_url}", settings={**QUEUE, "FILES_STORE": str(store), **settings})
    return subprocess.Popen(cmd, cwd=fetch.cwd, env=fetch.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(workers: list[subprocess.Popen[bytes]], timeout: float) -> tuple[list[int], list[str]]:
    """Each worker's exit status and log (bytes that are not UTF-8 shown as \\xNN), waiting at most
    *timeout* seconds in all; a worker still running then is killed and the test fails."""
    deadline = time.monotonic() + timeout
    codes, logs = [], []
    try:
        for w in workers:
            _, err = w.communicate(timeout=max(deadline - time.monotonic(), 1))
            codes.append(w.returncode)
            logs.append(err.decode("utf-8", "backslashreplace"))
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait(10)
    return codes, logs


def merged_manifest(fetch: Fetch, queue_url: str) -> list[dict]:
    out = fetch.cwd / "merged.jsonl"
    proc = scrapy(fetch, "queue", queue_url, "--manifest", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_bytes().decode("utf-8")  # strict: a record holds no undecodable bytes
    return [json.loads(line) for line in text.splitlines()]


def sent_header(request: dict, name: str) -> str | None:
    """A request header as the client meant it: the origin decodes heads as latin-1, fetcher sends UTF-8."""
    value = request["headers"].get(name)
    return None if value is None else value.encode("latin-1").decode("utf-8")


def requests_to(origin: Origin, path: str) -> list[dict]:
    return [r for r in origin.stats.snapshot().requests if r["path"] == path and r["method"] == "GET"]


def longest_line(text: str) -> int:
    return max((len(line) for line in text.split("\n")), default=0)


# -- 1. a queue entry that is not UTF-8 -------------------------------------------------------


def test_an_undecodable_queue_entry_is_dead_lettered_and_kills_no_worker(fetch: Fetch, origin: Origin,
                                                                          redis_server: RedisServer) -> None:
    u = origin.url
    queue_url = redis_server.url("bytes")
    before = [f"{u}/gen/3k/utf-before{i}.bin" for i in range(5)]
    after = [f"{u}/gen/3k/utf-after{i}.bin" for i in range(5)]
    enq = scrapy(fetch, "enqueue", queue_url, "-", stdin="".join(f"{x}\n" for x in before))
    assert enq.returncode == 0, enq.stderr  # the stream and its group exist now
    # Another client writes an entry whose URL is not UTF-8 (fields as stream.py's: u, and t).
    raw = redis.Redis(host="127.0.0.1", port=redis_server.port, decode_responses=False)
    try:
        bad = f"{u}/gen/3k/bad".encode() + b"\xff\xfe.bin"
        raw.xadd(b"fetcher:{bytes}:stream", {b"u": bad})
        raw.xadd(b"fetcher:{bytes}:stream", {b"u": bad + b"?t", b"t": bad + b"?t\n  out=\xff.bin"})
    finally:
        raw.close()
    enq = scrapy(fetch, "enqueue", queue_url, "-", stdin="".join(f"{x}\n" for x in after))
    assert enq.returncode == 0, enq.stderr

    store = fetch.cwd / "shared"
    codes, logs = finish([worker(fetch, queue_url, store) for _ in range(2)], timeout=90)
    assert all("Traceback" not in log for log in logs), logs
    assert all("UnicodeDecodeError" not in log for log in logs), logs
    assert codes == [0, 0], logs  # the valid entries all downloaded; the bad ones are the queue's, not a run's

    host = u.removeprefix("http://")
    for url in before + after:  # every valid entry, before and after the bad ones
        name = url.rsplit("/", 1)[1]
        path = store / host / "gen/3k" / name
        assert path.stat().st_size == 3072, url
    records = {r["url"]: r for r in merged_manifest(fetch, queue_url)}
    for url in before + after:
        assert records[url]["status"] == "downloaded", records[url]
        assert records[url]["checksum"] == expected_digest(url.rsplit("/", 1)[1], 3072)
    shown = f"{u}/gen/3k/bad\\xff\\xfe.bin"  # the bytes escaped: a backslash, x, two hex digits
    for url in (shown, f"{shown}?t"):
        record = records[url]
        assert record["status"] == "failed" and record["error"].startswith("dead-lettered"), record
        assert "UTF-8" in record["error"], record
    assert not any("\udcff" in json.dumps(r, ensure_ascii=False) for r in records.values())
    assert len(records) == len(before) + len(after) + 2
    joined = "".join(logs)
    assert f"dead-lettered {shown}" in joined, logs  # said, escaped, by the worker that took it
    assert "\\udcff" not in joined and "\ufffd" not in joined  # never as surrogates or replaced
    state = queue_state(fetch, queue_url)
    assert state["waiting"] == 0 and state["in flight"] == 0 and state["dead-lettered"] == 2, state
    assert state["done"] == len(before) + len(after) and state["failed"] == 2, state
    assert not any("/bad" in r["path"] for r in origin.stats.snapshot().requests)  # nothing of it was fetched


# -- 2. a queue entry is split into lines exactly as the enqueuer split them --------------------


def test_queue_entries_are_not_split_again_at_unicode_line_separators(fetch: Fetch, origin: Origin,
                                                                      redis_server: RedisServer) -> None:
    u = origin.url
    queue_url = redis_server.url("seps")
    separators = {"u2028": "\u2028", "x85": "\x85", "u2029": "\u2029"}
    listing = ""
    for label, sep in separators.items():
        listing += f"{u}/gen/2k/sep-{label}.bin\n  user-agent=Mozilla{sep}  out=elsewhere/{label}.bin\n"
    (fetch.cwd / "seps.txt").write_text(listing, encoding="utf-8")
    enq = scrapy(fetch, "enqueue", queue_url, "seps.txt")
    assert enq.returncode == 0, enq.stderr
    assert f"Enqueued {len(separators)} URLs" in enq.stderr, enq.stderr

    store = fetch.cwd / "store"
    codes, logs = finish([worker(fetch, queue_url, store)], timeout=60)
    assert codes == [0], logs
    assert "Traceback" not in logs[0], logs
    assert not (store / "elsewhere").exists()  # no out= smuggled in by a second split
    host = u.removeprefix("http://")
    records = {r["url"]: r for r in merged_manifest(fetch, queue_url)}
    for label, sep in separators.items():
        url = f"{u}/gen/2k/sep-{label}.bin"
        assert records[url]["status"] == "downloaded", records[url]
        assert records[url]["path"] == f"{host}/gen/2k/sep-{label}.bin", records[url]
        assert (store / host / f"gen/2k/sep-{label}.bin").stat().st_size == 2048
        sent = requests_to(origin, f"/gen/2k/sep-{label}.bin")
        assert len(sent) == 1, sent
        assert sent_header(sent[0], "user-agent") == f"Mozilla{sep}  out=elsewhere/{label}.bin"  # whole


# -- 3. the same for a list file and standard input --------------------------------------------


def _separator_list(u: str) -> tuple[str, int]:
    """A list whose lines hold U+2028, "\\x85" and a lone "\\r" (and the number of its last line).

    As one line each: two entries with a whole User-Agent, one bad line (a "\\r" is a control
    character in a value), comments that hide URLs, and a bad line whose number tells the count."""
    lines = [
        f"{u}/gen/1k/ls-u2028.bin",
        "  user-agent=UA-A\u2028  out=elsewhere/a.bin",
        f"# hidden\u2028{u}/gen/1k/ls-hidden-u2028.bin",
        f"{u}/gen/1k/ls-x85.bin",
        "  user-agent=UA-B\x85  out=elsewhere/b.bin",
        f"# hidden\x85{u}/gen/1k/ls-hidden-x85.bin",
        f"{u}/gen/1k/ls-cr.bin",
        "  user-agent=UA-C\r  out=elsewhere/c.bin",  # line 8: the entry of line 7 is a bad line
        f"# hidden\r{u}/gen/1k/ls-hidden-cr.bin",
        f"{u}/gen/1k/ls-last.bin",
        "not-a-url",  # line 11, if every line above was one line
    ]
    return "".join(f"{line}\n" for line in lines), len(lines)


def _check_separator_run(fetch: Fetch, origin: Origin, code: int, log: str, last: int) -> None:
    u = origin.url
    host = u.removeprefix("http://")
    assert code == 1, log[-3000:]  # two bad lines
    assert "Traceback" not in log, log[-3000:]
    store = fetch.cwd / "downloads"
    assert not (store / "elsewhere").exists()
    for label, agent in (("u2028", "UA-A\u2028  out=elsewhere/a.bin"), ("x85", "UA-B\x85  out=elsewhere/b.bin")):
        assert (store / host / f"gen/1k/ls-{label}.bin").stat().st_size == 1024
        sent = requests_to(origin, f"/gen/1k/ls-{label}.bin")
        assert [sent_header(r, "user-agent") for r in sent] == [agent]
    assert (store / host / "gen/1k/ls-last.bin").stat().st_size == 1024
    for label in ("u2028", "x85", "cr"):
        assert requests_to(origin, f"/gen/1k/ls-hidden-{label}.bin") == []  # a comment's rest is the comment
    assert requests_to(origin, "/gen/1k/ls-cr.bin") == []  # refused: a "\r" inside its user-agent=
    records = {r["url"]: r for r in (json.loads(x) for x in (store / "manifest.jsonl").read_text().splitlines())}
    assert records[f"{u}/gen/1k/ls-cr.bin"]["status"] == "failed"
    assert records[f"{u}/gen/1k/ls-cr.bin"]["error"].startswith("line 8: control characters in user-agent="), \
        records[f"{u}/gen/1k/ls-cr.bin"]
    assert records["not-a-url"]["error"].startswith(f"line {last}: "), records["not-a-url"]
    assert f"line {last}: not a valid http(s) URL" in log
    assert len(records) == 5, records


def test_a_list_file_keeps_unicode_separators_and_lone_cr_inside_lines(fetch: Fetch, origin: Origin) -> None:
    listing, last = _separator_list(origin.url)
    (fetch.cwd / "urls.txt").write_bytes(listing.encode("utf-8"))
    run = fetch(None, "-a", "list=urls.txt")
    _check_separator_run(fetch, origin, run.returncode, run.log, last)


def test_standard_input_keeps_unicode_separators_and_lone_cr_inside_lines(fetch: Fetch, origin: Origin) -> None:
    listing, last = _separator_list(origin.url)
    proc = subprocess.run(fetch.command("-a", "list=-"), check=False, cwd=fetch.cwd, env=fetch.env(),
                          input=listing.encode("utf-8"), capture_output=True, timeout=120)
    _check_separator_run(fetch, origin, proc.returncode, proc.stderr.decode("utf-8", "backslashreplace"), last)


# -- 4. unknown options: once per name, for a limited number of names --------------------------

N_UNKNOWN = 2000


def _unknown_options_list(u: str) -> str:
    """N_UNKNOWN entries, each with an unknown option of its own name, on a handful of origin files."""
    return "".join(f"{u}/gen/{16 + i % 4}/opt{i % 4}.bin?n={i}\n  opt{i:04d}=x\n" for i in range(N_UNKNOWN))


def _unknown_warnings(log: str, level: str = "WARNING") -> tuple[list[str], list[str]]:
    """The lines saying an unknown option, and those counting the warnings not said. (`scrapy
    enqueue` logs without levels: *level* "" there.)"""
    lines = log.splitlines()
    said = [line for line in lines if level in line and "unknown option '" in line]
    counted = [line for line in lines if level in line and "more list warnings" in line]
    return said, counted


def test_unknown_options_are_warned_for_a_limited_number_of_names(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    (fetch.cwd / "urls.txt").write_text(_unknown_options_list(u))
    started = time.monotonic()
    run = fetch(None, "-a", "list=urls.txt", timeout=180)
    took = time.monotonic() - started
    assert run.returncode == 0, run.log[-3000:]
    said, counted = _unknown_warnings(run.log)
    assert 1 <= len(said) <= 25, said
    assert len({line.split("unknown option", 1)[1] for line in said}) == len(said)  # one line per name
    assert len(counted) == 1, counted
    assert f"{N_UNKNOWN - len(said)} more list warnings" in counted[0], counted
    assert run.log.count("\n") < 200  # nothing else says it either
    records = run.manifest
    assert len(records) == N_UNKNOWN and {r["status"] for r in records} == {"downloaded"}
    assert sum(origin.stats.hits_by_path[f"/gen/{16 + k}/opt{k}.bin"] for k in range(4)) == N_UNKNOWN
    print(f"{N_UNKNOWN} entries with unknown options: {len(said)} warnings said, run took {took:.1f} s")


def test_enqueue_warns_unknown_options_for_a_limited_number_of_names(fetch: Fetch, origin: Origin,
                                                                     redis_server: RedisServer) -> None:
    (fetch.cwd / "urls.txt").write_text(_unknown_options_list(origin.url))
    enq = scrapy(fetch, "enqueue", redis_server.url("opts"), "urls.txt")
    assert enq.returncode == 0, enq.stderr[-3000:]
    assert f"Enqueued {N_UNKNOWN} URLs" in enq.stderr
    said, counted = _unknown_warnings(enq.stderr, level="")
    assert 1 <= len(said) <= 25, said
    assert len(counted) == 1 and f"{N_UNKNOWN - len(said)} more list warnings" in counted[0], counted


# -- 5. limits on input: memory stays flat -----------------------------------------------------

LONG_LINE = 50 * 1000 * 1000


def test_a_50_mb_line_in_a_gzip_list_is_a_bad_line_with_flat_memory(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    head = f"{u}/gen/1k/".encode()
    path = fetch.cwd / "list.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(head)
        chunk = b"a" * (1 << 20)
        left = LONG_LINE - len(head)
        while left:
            f.write(chunk[:left])
            left -= min(left, len(chunk))
        f.write(f"\n{u}/gen/2k/after-long.bin\n".encode())
    compressed = path.stat().st_size
    assert compressed < 100 * 1024  # about 51 KB on disk
    started = time.monotonic()
    run, peak_mib = measured(fetch, "-a", "list=list.gz", settings={"FETCHER_PROGRESS": "log"})
    code, log = run.returncode, run.log
    took = time.monotonic() - started
    print(f"50 MB line in a {compressed / 1024:.0f} KiB gzip list: peak RSS {peak_mib:.1f} MiB, {took:.1f} s")
    assert code == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    store = fetch.cwd / "downloads"
    host = u.removeprefix("http://")
    assert (store / host / "gen/2k/after-long.bin").stat().st_size == 2048
    records = [json.loads(x) for x in (store / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 2, [r["url"][:200] for r in records]
    failed = next(r for r in records if r["status"] == "failed")
    assert failed["error"].startswith("line 1: line of 50,000,000 characters is over the 65,536 limit"), \
        failed["error"][:300]
    assert len(json.dumps(failed)) < LONG_LINE_LIMIT
    assert longest_line(log) < LONG_LINE_LIMIT
    failed_list = (store / "failed.txt").read_text()
    assert "# line 1: line of 50,000,000 characters is over the 65,536 limit" in failed_list, failed_list[:3000]
    assert longest_line(failed_list) < LONG_LINE_LIMIT
    assert peak_mib < RSS_LIMIT_MIB


def _many_options(fetch: Fetch, origin: Origin, options: int) -> None:
    u = origin.url
    path = fetch.cwd / "options.txt"
    with path.open("wb") as f:
        f.write(f"{u}/gen/1k/many-options.bin\n".encode())
        block = b"  header=X-A: b\n" * 100_000
        left = options
        while left:
            n = min(left, 100_000)
            f.write(block[: n * 16])
            left -= n
        f.write(f"{u}/gen/2k/after-options.bin\n".encode())
    started = time.monotonic()
    run, peak_mib = measured(fetch, "-a", "list=options.txt", settings={"FETCHER_PROGRESS": "log"}, timeout=300)
    code, log = run.returncode, run.log
    took = time.monotonic() - started
    print(f"an entry of {options:,} option lines: peak RSS {peak_mib:.1f} MiB, {took:.1f} s")
    assert code == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    host = u.removeprefix("http://")
    store = fetch.cwd / "downloads"
    assert (store / host / "gen/2k/after-options.bin").stat().st_size == 2048
    assert requests_to(origin, "/gen/1k/many-options.bin") == []
    records = {r["url"]: r for r in (json.loads(x) for x in (store / "manifest.jsonl").read_text().splitlines())}
    bad = records[f"{u}/gen/1k/many-options.bin"]
    assert bad["status"] == "failed", bad
    assert f"entry of {options:,} options is over the 1,000 limit" in bad["error"], bad
    assert records[f"{u}/gen/2k/after-options.bin"]["status"] == "downloaded"
    assert longest_line(log) < LONG_LINE_LIMIT
    assert peak_mib < RSS_LIMIT_MIB


def test_an_entry_of_4_190_000_option_lines_is_a_bad_line_with_flat_memory(fetch: Fetch, origin: Origin) -> None:
    _many_options(fetch, origin, 4_190_000)  # a 63 MB list; about 13 s here
