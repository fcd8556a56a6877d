"""Faults, resume and bad input: real crawls against an origin that fails, stalls and drops."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Fetch, Run
from tests.origin import Origin, content_bytes, expected_digest

MiB = 1 << 20


def host_dir(run: Run, origin: Origin) -> Path:
    return run.store / origin.url.split("://")[1]


def requests_for(origin: Origin, path: str) -> list[dict]:
    return [r for r in origin.stats.snapshot().requests if r["path"] == path]


def assert_no_traceback(run: Run) -> None:
    assert "Traceback" not in run.log, run.log[-3000:]


# -- retries -------------------------------------------------------------------------------


def test_waiting_retries_hold_no_concurrency_slot(fetch: Fetch, origin: Origin) -> None:
    """CONCURRENT_REQUESTS=4; four URLs answer 503 + Retry-After: 3 twice; a hundred answer at once."""
    u = origin.url
    flaky = [f"/gen/2k/flaky{i}.bin" for i in range(4)]
    quick = [f"/gen/2k/quick{i}.bin" for i in range(100)]
    listing = "".join(f"{u}{p}?fail=503:2&retry_after=3\n" for p in flaky) + "".join(f"{u}{p}\n" for p in quick)
    run = fetch(listing, settings={"CONCURRENT_REQUESTS": 4, "FETCHER_RETRY_AFTER_MAX": 10, "LOG_LEVEL": "DEBUG"})
    assert run.returncode == 0, run.log
    stats = origin.stats.snapshot()
    assert stats.inflight_max <= 4
    order = [r["path"] for r in stats.requests]
    first_retry = min(i for i, p in enumerate(order) if p in flaky and order[: i].count(p) == 1)
    assert all(order.index(p) < first_retry for p in quick), "a retry fired before the hundred were done"
    for p in flaky:
        record = run.record(f"{u}{p}?fail=503:2&retry_after=3")
        assert record["status"] == "downloaded" and record["attempts"] == 3
        assert stats.hits_by_path[p] == 3
    assert len(re.findall(r"Retrying .* in 3\.0 s", run.log)) == 8


def test_retry_after_as_http_date(fetch: Fetch, origin: Origin) -> None:
    url = f"{origin.url}/gen/1k/dated.bin?fail=429:1&retry_after_date=2"
    run = fetch(f"{url}\n", settings={"LOG_LEVEL": "DEBUG"})  # retries are logged at DEBUG
    assert run.returncode == 0, run.log
    assert run.record(url)["attempts"] == 2
    waited = float(re.search(r"Retrying .* in ([\d.]+) s", run.log).group(1))
    assert 0.5 <= waited <= 2.5  # the server's date, not our 0.1 s backoff


def test_what_cannot_succeed_is_not_retried(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    codes = [404, 410, 401, 403]
    run = fetch("".join(f"{u}/status/{c}\n" for c in codes))
    assert run.returncode == 1
    for c in codes:
        record = run.record(f"{u}/status/{c}")
        assert record["status"] == "failed" and record["attempts"] == 1
        assert record["error"] == f"HTTP {c}" and record["http_status"] == c
        assert origin.stats.hits_by_path[f"/status/{c}"] == 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_connection_is_retried_then_reported(fetch: Fetch) -> None:
    url = f"http://127.0.0.1:{closed_port()}/file.bin"
    run = fetch(f"{url}\n", settings={"RETRY_TIMES": 2})
    assert run.returncode == 1
    record = run.record(url)
    assert record["attempts"] == 3 and record["status"] == "failed"
    assert "connection refused" in record["error"]
    assert_no_traceback(run)


# -- timeouts and resume -----------------------------------------------------------------------


def test_stalled_body_is_abandoned_and_resumed(fetch: Fetch, origin: Origin) -> None:
    size, stall_at = 4 * MiB, 1_000_000
    url = f"{origin.url}/gen/{size}/stall.bin?stall_at={stall_at}&stall_for=60"
    run = fetch(f"{url}\n", settings={"FETCHER_STALL_TIMEOUT": 1, "LOG_LEVEL": "DEBUG"})
    assert run.returncode == 0, run.log
    record = run.record(url)
    assert record["attempts"] == 2 and record["checksum"] == expected_digest("stall.bin", size)
    second = requests_for(origin, f"/gen/{size}/stall.bin")[-1]  # the first is still stalled at the origin
    assert second["headers"]["range"] == f"bytes={stall_at}-" and second["status"] == 206
    # The stall was the reason for the retry, and it was retried quietly (DEBUG), not reported as a failure.
    assert re.search(r"DEBUG: Retrying .*stall\.bin.*: no data for 1 s after \d+ body bytes", run.log), run.log
    assert " ERROR: " not in run.log


def test_dropped_connection_resumes_with_range(fetch: Fetch, origin: Origin) -> None:
    size, drop_at = 8 * MiB, 3_000_000
    url = f"{origin.url}/gen/{size}/drop.bin?drop_at={drop_at}"
    run = fetch(f"{url}\n")
    assert run.returncode == 0, run.log
    path = host_dir(run, origin) / f"gen/{size}/drop.bin?drop_at={drop_at}"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected_digest("drop.bin", size)
    first, second = requests_for(origin, f"/gen/{size}/drop.bin")
    offset = int(second["headers"]["range"].removeprefix("bytes=").rstrip("-"))
    assert second["headers"]["if-range"] and second["status"] == 206
    resent = origin.stats.bytes_by_path[f"/gen/{size}/drop.bin"] - size
    print(f"resume: dropped at {first['body_bytes']}, resumed at {offset}, re-sent {resent} bytes")
    assert 0 <= resent <= 64 * 1024
    assert run.record(url)["checksum"] == expected_digest("drop.bin", size)


def test_server_ignoring_range_starts_over(fetch: Fetch, origin: Origin) -> None:
    size = 2 * MiB
    url = f"{origin.url}/gen/{size}/norange.bin?drop_at=500000&no_range=1"
    run = fetch(f"{url}\n")
    assert run.returncode == 0, run.log
    assert requests_for(origin, f"/gen/{size}/norange.bin")[-1]["status"] == 200
    assert run.record(url)["checksum"] == expected_digest("norange.bin", size)


def test_changed_resource_is_never_spliced(fetch: Fetch, origin: Origin) -> None:
    size = 2 * MiB
    path = f"/gen/{size}/changing.bin"
    url = f"{origin.url}{path}?drop_at=700000"
    first = fetch(f"{url}\n", settings={"RETRY_TIMES": 0})
    assert first.returncode == 1 and list(first.store.rglob("*.part"))
    origin.versions[path] = 1
    try:
        second = fetch(f"{url}\n")
    finally:
        origin.versions.pop(path)
    assert second.returncode == 0, second.log
    last = requests_for(origin, path)[-1]
    assert last["headers"].get("if-range") and last["status"] == 200  # If-Range did not match
    assert second.record(url)["checksum"] == expected_digest("changing.bin", size, version=1)


def test_killed_run_resumes_and_skips_finished_files(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    slow = [f"/gen/{4 * MiB}/slow{i}.bin" for i in range(3)]
    small = [f"/gen/10k/small{i}.bin" for i in range(3)]
    listing = "".join(f"{u}{p}\n" for p in small) + "".join(f"{u}{p}?rate=1000000\n" for p in slow)
    (fetch.cwd / "urls.txt").write_text(listing)
    proc = subprocess.Popen(fetch.command("-a", "list=urls.txt"), cwd=fetch.cwd, env=fetch.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = fetch.cwd / "downloads"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sizes = [p.stat().st_size for p in parts.rglob("*.part")] if parts.exists() else []
        if len(sizes) == 3 and min(sizes) > 500_000:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for f in parts.rglob("*"):  # whatever sits at a final name is complete and correct
        if f.is_file() and ".bin" in f.name and not f.name.endswith((".part", ".part.meta")):
            name = f.name.split("?")[0]
            size = 10 * 1024 if name.startswith("small") else 4 * MiB
            assert hashlib.sha256(f.read_bytes()).hexdigest() == expected_digest(name, size), f
    run = fetch(None, "-a", "list=urls.txt")
    assert run.returncode == 0, run.log
    statuses = {r["url"].split("/")[-1]: r["status"] for r in run.manifest}
    assert all(statuses[p.split("/")[-1]] == "uptodate" for p in small)
    for p in slow:
        resumed = [r for r in requests_for(origin, p) if r["status"] == 206]
        assert resumed and resumed[0]["headers"]["range"] != "bytes=0-", f"{p} was not resumed"
        name = p.split("/")[-1]
        assert run.record(f"{u}{p}?rate=1000000")["checksum"] == expected_digest(name, 4 * MiB)
    sent = sum(origin.stats.bytes_by_path[p] for p in slow)  # both runs, killed connections included
    assert sent < 3 * 4 * MiB + 3 * MiB


def test_revalidation_asks_the_server(fetch: Fetch, origin: Origin) -> None:
    path = "/gen/64k/reval.bin"
    url = origin.url + path
    assert fetch(f"{url}\n").returncode == 0
    origin.reset_stats()
    run = fetch(f"{url}\n", settings={"FETCHER_REVALIDATE": True})
    assert run.returncode == 0, run.log
    record = run.record(url)
    assert record["status"] == "uptodate" and record["http_status"] == 304
    [request] = requests_for(origin, path)
    assert request["headers"].get("if-none-match") and origin.stats.bytes_sent == 0
    origin.versions[path] = 3
    try:
        run = fetch(f"{url}\n", settings={"FETCHER_REVALIDATE": True})
    finally:
        origin.versions.pop(path)
    assert run.record(url)["status"] == "downloaded"
    assert run.record(url)["checksum"] == expected_digest("reval.bin", 64 * 1024, version=3)


# -- bad input and hostile servers ------------------------------------------------------------


def test_empty_list_says_so(fetch: Fetch) -> None:
    run = fetch("# nothing here\n\n")
    assert run.returncode == 0
    assert "The list has no URLs to download" in run.log


def test_planted_symlink_is_not_followed(fetch: Fetch, origin: Origin, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = fetch.cwd / "downloads"
    store.mkdir()
    (store / origin.url.split("://")[1]).symlink_to(outside)
    url = f"{origin.url}/gen/1k/planted.bin"
    run = fetch(f"{url}\n")
    assert run.returncode == 1
    assert run.record(url)["status"] == "failed" and "symbolic link" in run.record(url)["error"]
    assert run.record(url)["path"] is None
    assert not any(outside.rglob("*"))


def test_content_disposition_cannot_choose_the_path(fetch: Fetch, origin: Origin) -> None:
    url = f"{origin.url}/disposition/1k/cd.bin?filename=../../../../etc/evil"
    run = fetch(f"{url}\n")
    assert run.returncode == 0, run.log
    assert run.record(url)["path"].endswith("disposition/1k/cd.bin?filename=..%2F..%2F..%2F..%2Fetc%2Fevil")
    assert not Path("/etc/evil").exists()


def test_gzip_encoding_leaves_the_real_bytes(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    polite, forced = f"{u}/gen/100k/gz1.bin?gzip=1", f"{u}/gen/100k/gz2.bin?gzip=force"
    run = fetch(f"{polite}\n{forced}\n")
    assert run.returncode == 0, run.log
    [req] = requests_for(origin, "/gen/100k/gz1.bin")
    assert req["headers"]["accept-encoding"] == "identity"
    assert (run.store / run.record(polite)["path"]).read_bytes() == content_bytes("gz1.bin", 100 * 1024)
    # A server that encodes anyway: the bytes it sent, neither decoded nor encoded twice.
    sent = (run.store / run.record(forced)["path"]).read_bytes()
    assert sent[:2] == b"\x1f\x8b" and gzip.decompress(sent) == content_bytes("gz2.bin", 100 * 1024)


def test_redirects_are_followed_and_loops_fail(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    chain, loop, pingpong = f"{u}/redirect/3/gen/1k/target.bin", f"{u}/loop/x", f"{u}/loop2/a/y"
    run = fetch(f"{chain}\n{loop}\n{pingpong}\n")
    assert run.returncode == 1
    record = run.record(chain)
    assert record["status"] == "downloaded" and record["path"].endswith("redirect/3/gen/1k/target.bin")
    assert record["checksum"] == expected_digest("target.bin", 1024)
    for url in (loop, pingpong):
        assert run.record(url)["status"] == "failed" and "redirect loop" in run.record(url)["error"]
    assert origin.stats.hits_by_path["/loop/x"] == 1
    assert_no_traceback(run)


@pytest.fixture(scope="module")
def tls_origin() -> Iterator[Origin]:
    with Origin(tls=True).start() as o:
        yield o


def test_tls_is_verified_by_default(fetch: Fetch, tls_origin: Origin) -> None:
    url = f"{tls_origin.url}/gen/1k/tls.bin"
    run = fetch(f"{url}\n")
    assert run.returncode == 1
    record = run.record(url)
    assert record["attempts"] == 1 and "certificate verify failed" in record["error"]
    assert_no_traceback(run)
    run = fetch(f"{url}\n", settings={"DOWNLOAD_VERIFY_CERTIFICATES": False})
    assert run.returncode == 0, run.log
    assert run.record(url)["checksum"] == expected_digest("tls.bin", 1024)


def test_short_body_is_a_failure_not_a_success(fetch: Fetch, origin: Origin) -> None:
    url = f"{origin.url}/gen/100k/short.bin?short=1000"
    run = fetch(f"{url}\n", settings={"RETRY_TIMES": 2})
    assert run.returncode == 1
    record = run.record(url)
    assert record["status"] == "failed" and record["attempts"] == 3 and record["path"] is None
    assert not (host_dir(run, origin) / "gen/100k/short.bin?short=1000").exists()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_fails_cleanly(fetch: Fetch, origin: Origin, small_disk: Path) -> None:
    u = origin.url
    names = [("a.bin", MiB), ("big.bin", 8 * MiB), ("b.bin", MiB)]
    listing = "".join(f"{u}/gen/{size}/{name}  out={name}\n" for name, size in names)
    run = fetch(listing, settings={"FILES_STORE": str(small_disk), "CONCURRENT_REQUESTS": 1})
    assert run.returncode == 1
    assert_no_traceback(run)
    records = {r["url"].split("/")[-1]: r for r in _manifest(small_disk)}
    assert "No space left on device" in records["big.bin"]["error"]
    assert not (small_disk / "big.bin").exists() and not (small_disk / "big.bin.part").exists()
    for name, size in names:
        if (small_disk / name).exists():
            assert hashlib.sha256((small_disk / name).read_bytes()).hexdigest() == expected_digest(name, size)


def _manifest(store: Path) -> list[dict]:
    return [json.loads(line) for line in (store / "manifest.jsonl").read_text().splitlines()]


def test_low_file_descriptor_limit(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    listing = "".join(f"{u}/gen/4k/fd{i}.bin\n" for i in range(600))
    (fetch.cwd / "urls.txt").write_text(listing)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.run(
        fetch.command("-a", "list=urls.txt",
                      settings={"CONCURRENT_REQUESTS": 512, "CONCURRENT_REQUESTS_PER_DOMAIN": 512}),
        cwd=fetch.cwd, env=fetch.env(), capture_output=True, text=True, timeout=300, preexec_fn=limit,
    )
    run = Run(proc.returncode, proc.stdout, proc.stderr, fetch.cwd)
    assert_no_traceback(run)
    assert "ulimit -n" in run.log
    assert run.returncode == 0
    assert len(run.manifest) == 600 and {r["status"] for r in run.manifest} == {"downloaded"}


def test_connections_are_reused(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    per_host = 4
    run = fetch("".join(f"{u}/gen/1k/reuse{i}.bin\n" for i in range(1000)),
                settings={"CONCURRENT_REQUESTS_PER_DOMAIN": per_host})
    assert run.returncode == 0, run.log
    print(f"1000 files, CONCURRENT_REQUESTS_PER_DOMAIN={per_host}: {origin.stats.connections} connections, "
          f"in flight at most {origin.stats.inflight_max}")
    assert origin.stats.connections <= 2 * per_host
    assert origin.stats.inflight_max <= per_host


def test_dns_failure_is_retried_then_reported(fetch: Fetch, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.dns import PORT_ENV, NXDomainServer

    url = "http://no-such-host.test/file.bin"
    with NXDomainServer() as dns:
        monkeypatch.setenv(PORT_ENV, str(dns.port))
        run = fetch(f"{url}\n", settings={"RETRY_TIMES": 1, "TWISTED_DNS_RESOLVER": "tests.dns.LoopbackResolver"})
    assert run.returncode == 1
    record = run.record(url)
    assert record["attempts"] == 2 and record["error"] == "DNS lookup failed for no-such-host.test"
    assert dns.queries.count("no-such-host.test") >= 2  # asked again on the retry
    assert_no_traceback(run)


def ctrl_c(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[str, float]:
    """Press Ctrl-C once; return what the crawl printed and how long it took to end."""
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # never leave a hung crawl behind
            proc.kill()
    return err, time.monotonic() - started


def test_ctrl_c_stops_promptly_and_a_rerun_finishes(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    listing = f"{u}/gen/4m/sigint-slow.bin?rate=2000000\n" + "".join(
        f"{u}/gen/1k/sigint{i}.bin?fail=503:1&retry_after=60\n" for i in range(20))
    (fetch.cwd / "urls.txt").write_text(listing)
    proc = subprocess.Popen(fetch.command("-a", "list=urls.txt", settings={"FETCHER_RETRY_AFTER_MAX": 60}),
                            cwd=fetch.cwd, env=fetch.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 30
    while origin.stats.hits < 21 and time.monotonic() < deadline:
        time.sleep(0.05)
    err, waited = ctrl_c(proc)
    assert proc.returncode == 1
    assert waited < 20, f"Ctrl-C took {waited:.1f} s; the retries wait 60 s"  # not held by the backoffs
    run = Run(proc.returncode, "", err, fetch.cwd)
    assert "Traceback" not in err
    assert len(run.manifest) == 21  # every URL has its record, stopped ones included
    assert (fetch.cwd / "downloads/failed.txt").exists()
    rerun = fetch(None, "-a", "list=urls.txt")
    assert rerun.returncode == 0, rerun.log
    assert {r["status"] for r in rerun.manifest} <= {"downloaded", "uptodate"}


def test_body_without_length_cut_by_a_reset_is_not_taken_as_complete(fetch: Fetch, origin: Origin) -> None:
    size = 1 * MiB
    url = f"{origin.url}/gen/{size}/nolen.bin?no_length=1&drop_at=300000"
    run = fetch(f"{url}\n")
    assert run.returncode == 0, run.log
    record = run.record(url)
    assert record["checksum"] == expected_digest("nolen.bin", size)
    # The cut was noticed and resumed: the 206's Content-Range gives the full length to check against.
    assert [r["status"] for r in requests_for(origin, f"/gen/{size}/nolen.bin")] == [200, 206]


def test_resume_works_after_a_redirect(fetch: Fetch, origin: Origin) -> None:
    size = 4 * MiB
    url = f"{origin.url}/redirect/0/gen/{size}/moved.bin?drop_at=1000000"
    run = fetch(f"{url}\n")
    assert run.returncode == 0, run.log
    second = requests_for(origin, f"/gen/{size}/moved.bin")[-1]
    assert second["status"] == 206 and second["headers"]["range"] == "bytes=1000000-"
    assert run.record(url)["checksum"] == expected_digest("moved.bin", size)


def test_two_urls_naming_one_file_do_not_share_it(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    first, second = f"{u}/gen/1k/one.bin", f"{u}/gen/1k/two.bin"
    run = fetch(f"{first}  out=same.bin\n{second}  out=same.bin\n", settings={"CONCURRENT_REQUESTS": 1})
    assert run.returncode == 1
    assert run.record(first)["status"] == "downloaded"
    assert run.record(second)["status"] == "failed" and run.record(second)["error"].endswith("same.bin")
    assert (run.store / "same.bin").read_bytes() == content_bytes("one.bin", 1024)


def test_undecodable_bytes_on_standard_input(fetch: Fetch, origin: Origin) -> None:
    proc = subprocess.run(
        fetch.command("-a", "list=-"), cwd=fetch.cwd, env={**fetch.env(), "LC_ALL": "C"},
        input=f"http://h\xff/x\n{origin.url}/gen/1k/after.bin\n".encode("latin-1"), capture_output=True, timeout=60,
    )
    run = Run(proc.returncode, "", proc.stderr.decode(), fetch.cwd)
    assert_no_traceback(run)
    assert run.record(f"{origin.url}/gen/1k/after.bin")["status"] == "downloaded"  # the rest of the list
    assert proc.returncode == 1 and len(run.manifest) == 2


def test_a_busy_host_does_not_hold_up_the_others(fetch: Fetch) -> None:
    """Files queued behind one host's limit hold no global transfer slot."""
    with Origin(host="127.0.0.3").start() as busy_host, Origin(host="127.0.0.2").start() as other:
        u, v = busy_host.url, other.url  # fresh origins: nothing left in flight by other tests
        busy = [f"{u}/gen/200k/busy{i}.bin?rate=400000" for i in range(24)]
        quick = [f"{v}/gen/1k/other{i}.bin" for i in range(4)]
        run = fetch("".join(f"{x}\n" for x in busy + quick),
                    settings={"CONCURRENT_REQUESTS": 8, "CONCURRENT_REQUESTS_PER_DOMAIN": 2})
    assert run.returncode == 0, run.log
    order = [r["url"] for r in run.manifest]  # written as each URL ends
    last_quick = max(order.index(q) for q in quick)
    assert last_quick < 8, f"the other host waited behind the busy one: {order}"
    assert busy_host.stats.inflight_max <= 2


def test_no_length_no_ranges_is_taken_as_sent(fetch: Fetch, origin: Origin) -> None:
    """Without a length or Range support nothing can check the end: one download, as curl would."""
    url = f"{origin.url}/gen/100k/plainclose.bin?no_range=1&no_length=1"
    run = fetch(f"{url}\n")
    assert run.returncode == 0, run.log
    assert run.record(url)["attempts"] == 1 and run.record(url)["checksum"] == expected_digest("plainclose.bin", 102400)
    assert origin.stats.hits_by_path["/gen/100k/plainclose.bin"] == 1


def test_a_name_taken_by_an_earlier_url_is_not_reused(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    first = f"{u}/gen/1k/first.bin"
    second = f"{u}/gen/1k/second.bin"
    taken = first.split("://")[1]
    run = fetch(f"{first}\n{second}  out={taken}\n", settings={"FETCHER_MAX_PENDING": 1})
    assert run.returncode == 1
    assert run.record(first)["status"] == "downloaded"
    assert run.record(second)["status"] == "failed" and run.record(second)["error"].endswith(taken)


def test_closespider_timeout_ends_the_run(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    listing = "".join(f"{u}/gen/3m/cst{i}.bin?rate=1000000\n" for i in range(6))
    started = time.monotonic()
    run = fetch(listing, settings={"CLOSESPIDER_TIMEOUT": 1, "CONCURRENT_REQUESTS": 2}, timeout=60)
    assert time.monotonic() - started < 30
    assert "closespider_timeout" in run.log
    assert len(run.manifest) == 6  # the ones never started are recorded as stopped
    assert {r["status"] for r in run.manifest} <= {"downloaded", "failed"}
    # The exit status follows the records, whatever the finish reason.
    assert run.returncode == (1 if any(r["status"] == "failed" for r in run.manifest) else 0)


def test_one_ctrl_c_cuts_large_transfers_and_the_rerun_resumes_them(fetch: Fetch, origin: Origin) -> None:
    """Two 12 MiB files at 1 MB/s would take 12 s more: one Ctrl-C ends the run within seconds."""
    u = origin.url
    names = [f"sigint-big{i}.bin" for i in range(2)]
    (fetch.cwd / "urls.txt").write_text("".join(f"{u}/gen/12m/{n}?rate=1000000\n" for n in names))
    proc = subprocess.Popen(fetch.command("-a", "list=urls.txt"), cwd=fetch.cwd, env=fetch.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parts = [fetch.cwd / "downloads" / u.removeprefix("http://") / "gen/12m" / f"{n}?rate=1000000.part"
             for n in names]
    deadline = time.monotonic() + 30
    # The origin's counters, not the .part sizes: a preallocated .part is 12 MiB from its first byte.
    while (min(origin.stats.bytes_by_path[f"/gen/12m/{n}"] for n in names) < 1_000_000
           and time.monotonic() < deadline):
        time.sleep(0.05)
    err, waited = ctrl_c(proc)
    assert proc.returncode == 1
    assert waited < 6, f"one Ctrl-C took {waited:.1f} s; the transfers had 11 s to go"
    assert "no second Ctrl-C needed" in err and "Traceback" not in err
    run = Run(proc.returncode, "", err, fetch.cwd)
    assert {r["status"] for r in run.manifest} == {"failed"} and len(run.manifest) == 2
    kept = [p.stat().st_size for p in parts]
    assert all(k > 500_000 for k in kept), kept  # the .part files stay for the rerun
    # The cut requests are counted when the origin sees their connections gone: not in the rerun's.
    assert origin.wait_ended([f"/gen/12m/{n}" for n in names], 10), "the stopped run's requests are still going"
    origin.reset_stats()
    rerun = fetch(None, "-a", "list=urls.txt", settings={"FETCHER_STALL_TIMEOUT": 30})
    assert rerun.returncode == 0, rerun.log
    for n in names:
        assert rerun.record(f"{u}/gen/12m/{n}?rate=1000000")["checksum"] == expected_digest(n, 12 * MiB)
        requests = requests_for(origin, f"/gen/12m/{n}")
        assert len(requests) == 1, requests
        assert requests[0]["status"] == 206 and requests[0]["headers"]["range"] != "bytes=0-"


def test_mirrors_fail_over_and_the_record_names_the_one_that_served(fetch: Fetch, origin: Origin) -> None:
    u, dead = origin.url, f"http://127.0.0.1:{closed_port()}"
    good = f"{u}/gen/256k/mirrored.bin"
    missing = f"{u}/status/404"
    listing = (f"{dead}/mirrored.bin\t{missing}\t{good}\n"  # aria2's TAB-separated mirrors
               f"{u}/status/410 {u}/status/404\n")  # every mirror fails for good
    run = fetch(listing, settings={"RETRY_TIMES": 1})
    assert run.returncode == 1
    record = run.record(f"{dead}/mirrored.bin")
    assert record["status"] == "downloaded" and record["mirror"] == good
    assert record["checksum"] == expected_digest("mirrored.bin", 256 * 1024)
    assert origin.stats.hits_by_path["/gen/256k/mirrored.bin"] == 1
    both = run.record(f"{u}/status/410")
    assert both["status"] == "failed" and "every mirror failed" in both["error"]
    assert "HTTP 410" in both["error"] and "HTTP 404" in both["error"]
    assert origin.stats.hits_by_path["/status/410"] == 1  # a 410 is final for that mirror: not asked again


def test_per_entry_headers_reach_the_server(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    listing = (f"{u}/gen/1k/h.bin\n  header=X-Token: abc def\n  header=Accept-Language: fr\n"
               f"  referer=*\n  user-agent=fetcher-test/1.0\n")
    run = fetch(listing)
    assert run.returncode == 0, run.log
    [request] = requests_for(origin, "/gen/1k/h.bin")
    assert request["headers"]["x-token"] == "abc def" and request["headers"]["accept-language"] == "fr"
    assert request["headers"]["referer"] == f"{u}/gen/1k/h.bin"
    assert request["headers"]["user-agent"] == "fetcher-test/1.0"
