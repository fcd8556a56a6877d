"""What a person sees: the progress display, the summary, failed.txt and the logs."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Iterator

import pytest

from fetcher.extensions import progress_line
from tests.conftest import SCRAPY, Fetch
from tests.origin import Origin, expected_digest

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_terminal(fetch: Fetch, args: list[str], timeout: float = 60, columns: int = 160) -> tuple[int, str]:
    """Run the crawl with a pseudo-terminal as stdin/stdout/stderr; return its exit status and screen bytes."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(fetch.command(*args), cwd=fetch.cwd, env=fetch.env(),
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    try:
        return proc.wait(10), b"".join(chunks).decode("utf-8", "replace")
    finally:
        if proc.poll() is None:  # never leave a hung crawl behind
            proc.kill()


def test_progress_bar_on_a_terminal(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    (fetch.cwd / "urls.txt").write_text(
        f"{u}/gen/3m/slow.bin?rate=1500000\n{u}/gen/1k/quick.bin\n{u}/status/404\n"
    )
    code, screen = run_in_terminal(fetch, ["-a", "list=urls.txt"])
    assert code == 1  # the 404
    frames = [ANSI.sub("", f) for f in re.split(r"[\r\n]", screen) if f.strip()]
    bars = [f for f in frames if f.startswith("fetcher ") and " files |" in f]
    assert len(bars) >= 3, screen  # it moved
    assert any(re.search(r"fetcher [0-2]/3 files \|.*MiB/s, 1 active, 0 retries waiting", b) for b in bars)
    assert re.search(r"fetcher 3/3 files \|█+\| .*, 0 active, 0 retries waiting, 1 failed", bars[-1]), bars[-1]
    # Log lines are whole lines above the bar, not spliced into it.
    [failure] = [f for f in frames if "Failed " in f]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[fetcher\.pipelines\] ERROR: Failed "
                        + re.escape(f"{u}/status/404") + r": HTTP 404", failure), failure
    assert any(f.startswith(tuple("0123456789")) and "fetcher summary: 3 URLs" in f for f in frames)


@pytest.mark.parametrize("columns", [80, 120])
def test_progress_bar_fits_the_terminal_and_keeps_the_failures(fetch: Fetch, origin: Origin, columns: int) -> None:
    u = origin.url
    listing = f"{u}/gen/3m/narrow.bin?rate=1500000\n{u}/status/404\n" + "".join(
        f"{u}/gen/1k/n{i}.bin\n" for i in range(20))
    (fetch.cwd / "urls.txt").write_text(listing)
    code, screen = run_in_terminal(fetch, ["-a", "list=urls.txt"], columns=columns)
    assert code == 1
    bars = [ANSI.sub("", f).rstrip() for f in re.split(r"[\r\n]", screen) if f.startswith("fetcher ")
            or ANSI.sub("", f).startswith("fetcher ")]
    assert len(bars) >= 2, screen
    assert all(len(b) < columns for b in bars), [b for b in bars if len(b) >= columns]
    assert all(re.search(r", \d+ failed(, ETA \d+:\d\d:\d\d)?$", b) for b in bars), bars
    # The list was counted ahead: the total is known from the first frames on.
    assert all("/22 files" in b for b in bars), bars
    assert any("ETA " in b for b in bars[:-1]), bars


def test_progress_line_drops_the_least_useful_parts_first() -> None:
    figures = {"done": 1500, "total": 3004, "received": 47_000_000, "rate": 18_000_000, "active": 12,
               "waiting": 1, "failed": 2, "eta": 3723}
    wide = progress_line(figures, 200)
    assert wide == ("fetcher 1500/3004 files |█████████           | 44.8 MiB, 17.2 MiB/s, 12 active, "
                    "1 retries waiting, 2 failed, ETA 1:02:03")
    assert progress_line(figures, 100) == ("fetcher 1500/3004 files |█████████           | 44.8 MiB, "
                                           "17.2 MiB/s, 2 failed, ETA 1:02:03")
    assert progress_line(figures, 80) == "fetcher 1500/3004 files |████      | 17.2 MiB/s, 2 failed, ETA 1:02:03"
    assert progress_line(figures, 30) == "fetcher 1500/3004 files 2 failed"  # never without the failures


def test_plain_progress_lines_without_a_terminal(fetch: Fetch, origin: Origin) -> None:
    run = fetch(f"{origin.url}/gen/2m/plain.bin?rate=2000000\n", settings={"FETCHER_PROGRESS_INTERVAL": 0.25})
    assert run.returncode == 0, run.log
    lines = [line for line in run.log.splitlines() if "Progress: " in line]
    assert len(lines) >= 2
    assert re.search(r"\[fetcher\.extensions\] INFO: Progress: 0/1 files, [\d.]+ (KiB|MiB), [\d.]+ (KiB|MiB)/s, "
                     r"1 active, 0 retries waiting, 0 failed", lines[0]), lines[0]
    assert "\r" not in run.log and "█" not in run.log


@pytest.fixture
def second_origin() -> Iterator[Origin]:
    with Origin(host="127.0.0.2").start() as o:  # another loopback address: another host
        yield o


def test_summary_failed_list_and_rerun_of_failures(fetch: Fetch, origin: Origin, second_origin: Origin) -> None:
    u, v = origin.url, second_origin.url
    listing = "\n".join([
        f"{u}/gen/4m/ok1.bin",
        f"{v}/gen/1m/slowhost.bin?rate=1000000",
        f"{u}/status/404",
        f"{u}/gen/1k/missing.bin?fail=404:0",
        f"{u}/gen/1k/bad.bin  out=kept/bad.bin  sha256={'a' * 64}",
        "htp:/typo",
    ]) + "\n"
    run = fetch(listing)
    assert run.returncode == 1
    summary = run.log[run.log.index("fetcher summary"):]
    assert "6 URLs in" in summary and "2 downloaded, 0 up to date, 4 failed" in summary
    assert re.search(r"received [\d.]+ (KiB|MiB) at [\d.]+ (KiB|MiB)/s", summary)
    # Hosts slowest first, by bytes per second per file; the second origin sends at 1 MB/s,
    # the first at loopback speed (tens of MB/s even on a busy machine).
    [slowest] = [line for line in summary.splitlines() if "slowest hosts: " in line]
    rates = {host: float(rate) * (1 if unit == "MiB" else 1 / 1024) for host, rate, unit in
             re.findall(r"(127\.0\.0\.\d:\d+) \(([\d.]+) (KiB|MiB)/s per file, 1 file\)", slowest)}
    assert set(rates) == {u.removeprefix("http://"), v.removeprefix("http://")}, slowest
    assert list(rates.values()) == sorted(rates.values()), slowest
    assert list(rates) == [v.removeprefix("http://"), u.removeprefix("http://")], slowest
    assert rates[v.removeprefix("http://")] <= 1.5, slowest
    [not_found] = [line for line in summary.splitlines() if "2 × HTTP 404: " in line]
    assert f"{u}/status/404" in not_found and f"{u}/gen/1k/missing.bin?fail=404:0" in not_found  # any order
    assert f"1 × checksum mismatch: {u}/gen/1k/bad.bin" in summary
    assert "1 × bad list line: htp:/typo" in summary
    # One readable line per failure at the default level, and no DEBUG noise.
    assert len(re.findall(r"\] ERROR: ", run.log)) == 4
    assert " DEBUG: " not in run.log and "Traceback" not in run.log

    failed = (run.store / "failed.txt").read_text()
    assert f"{u}/gen/1k/bad.bin\n  out=kept/bad.bin\n  checksum=sha-256={'a' * 64}\n" in failed  # options kept
    assert "# line 6: unsupported scheme 'htp': htp:/typo" in failed
    origin.reset_stats()
    second_origin.reset_stats()
    first = {r["url"]: r for r in run.manifest}
    rerun = fetch(None, "-a", "list=downloads/failed.txt")
    assert rerun.returncode == 1
    assert "3 URLs in" in rerun.log  # only the failures were tried again
    assert origin.stats.hits_by_path["/gen/4m/ok1.bin"] == 0 and second_origin.stats.hits == 0
    # The store keeps every URL's current record: the rerun's three, and the first run's others as they were.
    records = {r["url"]: r for r in rerun.manifest}
    assert set(records) == set(first) and len(rerun.manifest) == 6
    retried = {f"{u}/status/404", f"{u}/gen/1k/missing.bin?fail=404:0", f"{u}/gen/1k/bad.bin"}
    for url, record in records.items():
        if url in retried:
            assert record["run"] != first[url]["run"] and record["finished_at"] > first[url]["finished_at"]
        else:
            assert record == first[url]
    # The list it read was replaced at the end, with the store's failures.
    assert (run.store / "failed.txt").read_text().count("\nhttp") == 3


def test_settings_show_effective_values(fetch: Fetch) -> None:
    out = subprocess.run([SCRAPY, "settings", "--get", "FETCHER_ALGORITHM"], cwd=fetch.cwd, env=fetch.env(),
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "sha256"
    out = subprocess.run([SCRAPY, "settings", "--get", "CONCURRENT_REQUESTS", "-s", "CONCURRENT_REQUESTS=7"],
                         cwd=fetch.cwd, env=fetch.env(), capture_output=True, text=True, check=True).stdout
    assert out.strip() == "7"


def test_retried_downloads_stay_quiet_until_they_fail(fetch: Fetch, origin: Origin) -> None:
    url = f"{origin.url}/gen/4k/flaky.bin?fail=503:2"
    run = fetch(f"{url}\n")
    assert run.returncode == 0, run.log
    assert run.record(url)["attempts"] == 3
    assert run.record(url)["checksum"] == expected_digest("flaky.bin", 4096)
    assert "Retrying" not in run.log and "ERROR" not in run.log


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_per_file_debug_lines_show_at_debug_only(fetch: Fetch, origin: Origin, level: str) -> None:
    """Below LOG_LEVEL Scrapy's per-file DEBUG lines are not even made; LOG_LEVEL=DEBUG keeps them."""
    url = f"{origin.url}/gen/4k/one.bin"
    run = fetch(f"{url}\n", settings={"LOG_LEVEL": level})
    assert run.returncode == 0, run.log
    shown = "Crawled (200)" in run.log and "Scraped from" in run.log
    assert shown is (level == "DEBUG"), run.log[-3000:]
