"""One run, N worker processes (fetcher.workers): real ``scrapy crawl fetch`` runs against the
test origin, asserting on records, files, the origin's counters, exit status and processes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from scrapy.statscollectors import StatsCollector
from scrapy.utils.test import get_crawler

from fetcher.items import FileRecord
from fetcher.transfer.ratelimit import SharedTokenBucket, TokenBucket
from fetcher.listing.urllist import Entry
from fetcher.workers.crew import Crew
from fetcher.workers.plan import AUTO_MIN_ENTRIES, Limits, choose, cores, share, shares
from tests.conftest import Fetch, Run
from tests.origin import Origin, expected_digest

MiB = 1024 * 1024
LIMITS = Limits(total=64, per_domain=16, per_ip=0, slots={}, delay=0.0, autothrottle=False,
                target_concurrency=1.0, max_pending=1000)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead worker reparented to an init that does not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _check_files(run: Run, files: dict[str, tuple[str, int]]) -> None:
    for url, (name, size) in files.items():
        record = run.record(url)
        assert record["status"] == "downloaded", record
        data = (run.store / record["path"]).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == expected_digest(name, size), url


# -- how many workers, and their shares (pure)

def test_auto_needs_a_long_list_and_no_pacing() -> None:
    big = AUTO_MIN_ENTRIES
    assert choose(None, LIMITS, entries=big, kind="list", available=4).workers == 4
    assert choose(None, LIMITS, entries=big - 1, kind="list", available=4).workers == 1  # short, or slow
    assert choose(None, LIMITS, entries=big, kind="list", scrapyd=True, available=4).workers == 1
    paced = Limits(**{**LIMITS.__dict__, "delay": 0.5})
    assert choose(None, paced, entries=big, kind="list", available=4).workers == 1
    assert choose(3, paced, entries=0, kind="list").workers == 3  # asked for: the delay is stretched instead
    for kind in ("inline", "queue"):
        plan = choose(4, LIMITS, entries=big, kind=kind)
        assert plan.workers == 1 and "FETCHER_WORKERS=4" in plan.why
    one_per_host = Limits(**{**LIMITS.__dict__, "per_domain": 1})
    plan = choose(4, one_per_host, entries=big, kind="list")
    assert plan.workers == 1 and "lowered to 1" in plan.why
    slot = Limits(**{**LIMITS.__dict__, "slots": {"a.test": {"concurrency": 2}}})
    assert choose(8, slot, entries=0, kind="list").workers == 2


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shares_add_up_to_the_run_limits(n: int) -> None:
    limits = Limits(**{**LIMITS.__dict__, "per_domain": 7, "slots": {"a.test": {"concurrency": 9, "delay": 1}},
                       "delay": 0.25})
    each = [shares(limits, n, i) for i in range(n)]
    assert sum(int(s["CONCURRENT_REQUESTS"]) for s in each) == 64
    assert sum(int(s["CONCURRENT_REQUESTS_PER_DOMAIN"]) for s in each) == 7
    assert sum(json.loads(s["DOWNLOAD_SLOTS"])["a.test"]["concurrency"] for s in each) == 9
    assert all(float(s["DOWNLOAD_DELAY"]) == 0.25 * n for s in each)
    assert [share(5, 3, i) for i in range(3)] == [2, 2, 1]


def test_a_shared_bucket_is_one_cap_for_every_process(tmp_path: Path) -> None:
    """Two buckets on one file (two workers) share one balance: the second pays the first's debt."""
    rate = 1024 * 1024
    a = SharedTokenBucket(tmp_path / "total.rate", rate, now=0.0)
    b = SharedTokenBucket(tmp_path / "total.rate", rate, now=0.0)
    burst = TokenBucket(rate).burst
    assert a.take(int(burst), 0.0) == 0.0
    assert b.take(rate, 0.0) == pytest.approx(1.0)  # alone, it would owe 1 MiB less its own burst
    assert a.take(0, 1.0) == pytest.approx(0.0)  # paid back after a second


# -- real runs

def test_workers_share_one_list_and_give_one_report(fetch: Fetch, origin: Origin) -> None:
    """Three workers: every URL recorded once, with the run's id; one 404, one path conflict and
    one bad line among them: exit 1, one failed.txt, one summary, one feed, the stats added up."""
    u = origin.url
    files = {f"{u}/gen/8k/w{i}.bin": (f"w{i}.bin", 8192) for i in range(60)}
    listing = "".join(f"{url}\n" for url in files)
    listing += f"{u}/gen/8k/w0.bin\n"  # a duplicate: skipped by the run, never dealt
    listing += f"{u}/status/404\n"
    listing += f"{u}/gen/1k/same-a.bin\n  out=same.bin\n{u}/gen/1k/same-b.bin\n  out=same.bin\n"
    listing += "http://\n"  # a bad line
    secret = u.replace("http://", "http://alice:s3cret-pw@") + "/status/403"  # logged by a worker, redacted
    listing += f"{secret}\n"
    run = fetch(listing, "-O", "items.jsonl", settings={
        "FETCHER_WORKERS": 3, "FETCHER_PROGRESS": "log", "FETCHER_PROGRESS_INTERVAL": 0.1, "STATS_DUMP": True})
    assert run.returncode == 1, run.log[-3000:]
    assert "Downloading with 3 worker processes" in run.log
    urls = [r["url"] for r in run.manifest]
    assert len(urls) == len(set(urls)) == 60 + 1 + 2 + 1 + 1, Counter(urls).most_common(3)
    assert "s3cret-pw" not in run.log and "s3cret-pw" not in (run.store / "manifest.jsonl").read_text()
    _check_files(run, files)
    assert len({r["run"] for r in run.manifest}) == 1  # the workers write the run's records
    assert run.record(f"{u}/status/404")["http_status"] == 404
    same = sorted(run.record(f"{u}/gen/1k/same-{x}.bin")["status"] for x in "ab")
    assert same == ["downloaded", "failed"]  # one name, two URLs: one worker, today's answer
    assert "path conflict" in run.log or "another URL of this run" in run.log
    failed = (run.store / "failed.txt").read_text()
    assert failed.count(f"{u}/status/404") == 1 and "same-" in failed
    assert run.log.count("fetcher summary:") == 1 and "65 URLs" in run.log and "4 failed" in run.log
    assert run.log.count("Retry them with") == 1
    items = [json.loads(line) for line in (fetch.cwd / "items.jsonl").read_text().splitlines()]
    assert sorted(i["url"] for i in items) == sorted(set(urls) - {"http://"})  # a bad line is no item
    assert "'downloader/response_count': " in run.log and "'fetcher/downloaded': 61" in run.log
    responses = int(run.log.split("'downloader/response_count': ")[1].split(",")[0])
    assert responses >= 62  # the workers' own, added into the run's
    progress = [line for line in run.log.splitlines() if "Progress: " in line]
    # The run's total (counted ahead from the list: 66 URL lines, then 65 once read), never a worker's share.
    assert progress and all("/66 files" in line or "/65 files" in line for line in progress), progress
    # One log, each line whole: every line is a log line or the continuation of one.
    for line in run.log.splitlines():
        assert line[:4].isdigit() or line.startswith((" ", "{", "}", "'")), line


@pytest.mark.parametrize(("per_host", "workers", "expected"), [(2, 2, 2), (1, 3, 1)])
def test_the_per_host_limit_holds_for_the_run(fetch: Fetch, per_host: int, workers: int, expected: int) -> None:
    # An origin of its own: its in-flight count is this run's alone (the session's origin may still
    # be serving a client an earlier test killed).
    with Origin().start() as host:
        files = {f"{host.url}/gen/4k/host{i}.bin?delay=0.1": (f"host{i}.bin", 4096) for i in range(16)}
        run = fetch("".join(f"{url}\n" for url in files),
                    settings={"FETCHER_WORKERS": workers, "CONCURRENT_REQUESTS_PER_DOMAIN": per_host})
        assert run.returncode == 0, run.log[-3000:]
        _check_files(run, files)
        assert host.stats.inflight_max <= per_host, host.stats.inflight_max
    assert (f"Downloading with {expected} worker processes" in run.log) == (expected > 1)
    if workers > expected:
        assert f"FETCHER_WORKERS={workers} lowered to {expected}" in run.log


def test_the_rate_cap_holds_for_the_run(fetch: Fetch, origin: Origin) -> None:
    """FETCHER_MAX_RATE=1 MiB/s with two workers: 6 MiB take about 6 s (two workers each
    with the whole cap would take half that): the workers share one bucket."""
    marker = f"{origin.url}/gen/1k/start-w.bin"
    files = {f"{origin.url}/gen/2m/wcap{i}.bin": (f"wcap{i}.bin", 2 * MiB) for i in range(3)}
    run = fetch("".join(f"{u}\n" for u in [marker, *files]), settings={"FETCHER_WORKERS": 2, "FETCHER_MAX_RATE": MiB})
    assert run.returncode == 0, run.log[-3000:]
    _check_files(run, files)
    assert "Downloading with 2 worker processes" in run.log

    def finished(url: str) -> float:
        stamp = run.record(url)["finished_at"]
        return time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) + float(stamp[19:-1] or 0)

    took = max(finished(u) for u in files) - finished(marker)
    floor = (6 * MiB - TokenBucket(MiB).burst) / MiB
    assert floor - 0.5 <= took <= 3 * 6.0, took


def _start(fetch: Fetch, listing: str, **settings: object) -> subprocess.Popen[str]:
    (fetch.cwd / "urls.txt").write_text(listing)
    return subprocess.Popen(fetch.command("-a", "list=urls.txt", settings=dict(settings)), cwd=fetch.cwd,
                            env=fetch.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_killed_worker_leaves_its_files_to_the_others(fetch: Fetch, origin: Origin) -> None:
    files = {f"{origin.url}/gen/1m/kw{i}.bin?rate=400000": (f"kw{i}.bin", MiB) for i in range(8)}
    proc = _start(fetch, "".join(f"{u}\n" for u in files), FETCHER_WORKERS=2)
    try:
        _wait_for(lambda: len(_children(proc.pid)) == 2 and origin.stats.bytes_sent > MiB, 60, "bytes flowing")
        os.kill(_children(proc.pid)[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    run = Run(proc.returncode, "", err, fetch.cwd)
    assert run.returncode == 0, run.log[-3000:]
    assert "killed by SIGKILL" in run.log and "the other workers take them over" in run.log
    _check_files(run, files)
    assert len(run.manifest) == 8
    # Its .part files were resumed, not fetched again from the start.
    assert origin.stats.bytes_sent < 8 * MiB + 4 * MiB, origin.stats.bytes_sent


def test_a_killed_run_takes_its_workers_with_it(fetch: Fetch, origin: Origin) -> None:
    files = [f"{origin.url}/gen/2m/kr{i}.bin?rate=200000" for i in range(6)]
    proc = _start(fetch, "".join(f"{u}\n" for u in files), FETCHER_WORKERS=2)
    try:
        _wait_for(lambda: len(_children(proc.pid)) == 2 and origin.stats.bytes_sent > 0, 60, "workers")
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        _wait_for(lambda: not any(_running(w) for w in workers), 3 * 3, "the workers to stop")
    finally:
        proc.kill()
        proc.communicate()


def test_one_ctrl_c_stops_every_worker(fetch: Fetch, origin: Origin) -> None:
    """Ctrl-C on the run's terminal: the run and both workers end within seconds, the .part files kept."""
    files = [f"{origin.url}/gen/2m/cc{i}.bin?rate=200000" for i in range(6)]
    (fetch.cwd / "urls.txt").write_text("".join(f"{u}\n" for u in files))
    command = fetch.command("-a", "list=urls.txt", settings={"FETCHER_WORKERS": 2})
    pid, fd = pty.fork()
    if pid == 0:  # the child: the run, with the pseudo-terminal as its terminal
        os.chdir(fetch.cwd)
        os.execve(command[0], command, fetch.env())
    output = bytearray()

    def read(seconds: float) -> bool:
        ready, _, _ = select.select([fd], [], [], seconds)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                return False
            output.extend(data)
            return bool(data)
        return True

    try:
        deadline = time.monotonic() + 60
        parts = fetch.cwd / "downloads"
        while not (len(_children(pid)) == 2 and parts.exists()
                   and sum(p.stat().st_size for p in parts.rglob("*.part")) > 400_000):
            assert time.monotonic() < deadline and read(0.05), output.decode(errors="replace")[-2000:]
        workers = _children(pid)
        os.write(fd, b"\x03")  # Ctrl-C, as a person types it
        stopped = time.monotonic()
        while read(0.1) and time.monotonic() - stopped < 30:
            pass
        _, status = os.waitpid(pid, 0)
        took = time.monotonic() - stopped
    finally:
        os.close(fd)
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
    log = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 1, log[-3000:]
    assert took < 3 * 3, (took, log[-3000:])  # about a second here
    assert not any(_running(w) for w in workers)
    assert list((fetch.cwd / "downloads").rglob("*.part")), "the .part files are kept for the rerun"
    assert log.count("fetcher summary:") == 1


def test_auto_starts_workers_for_a_long_list(fetch: Fetch, origin: Origin) -> None:
    """auto reads the first entries: 2,000 of them make it one worker per core (fragments of one
    URL here: one download, the rest duplicates)."""
    url = f"{origin.url}/gen/1k/auto.bin"
    run = fetch(url + "\n" + "".join(f"{url}#{i}\n" for i in range(AUTO_MIN_ENTRIES)))
    assert run.returncode == 0, run.log[-3000:]
    assert run.record(url)["status"] == "downloaded" and len(run.manifest) == 1
    assert (f"Downloading with {cores()} worker processes" in run.log) == (cores() > 1)
    short = fetch(url + "\n")
    assert "worker processes" not in short.log
    inline = fetch(None, "-a", f"urls={url}", settings={"FETCHER_WORKERS": 2})
    assert inline.returncode == 0 and "-a urls= runs in one process" in inline.log, inline.log[-2000:]


def test_two_runs_starting_at_once_into_a_new_store(fetch: Fetch, origin: Origin) -> None:
    store = fetch.cwd / "new" / "deep" / "store"
    procs = []
    for i in range(2):
        (fetch.cwd / f"l{i}.txt").write_text(f"{origin.url}/gen/1k/race{i}.bin\n")
        procs.append(subprocess.Popen(
            fetch.command("-a", f"list=l{i}.txt", settings={"FILES_STORE": str(store)}), cwd=fetch.cwd,
            env=fetch.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "File exists" not in err, err[-2000:]
    assert sorted(p.name for p in store.rglob("race*.bin")) == ["race0.bin", "race1.bin"]


def test_a_worker_that_cannot_start_is_an_error_of_the_run() -> None:
    """A worker process that exits before it is ready: the run is told it cannot end well, and
    the entries it had come back failed ("worker lost") rather than never."""
    failures: list[str] = []
    answers: list[FileRecord] = []

    async def run() -> None:
        crew = Crew(1, lambda index, fd: [sys.executable, "-c", "raise SystemExit(3)"], env=dict(os.environ),
                    key=hash, answered=answers.append, stats=StatsCollector(get_crawler()),
                    failed=failures.append, unwritten=lambda: None)
        crew.deal(Entry("http://127.0.0.1:9/never.bin", 1))
        await asyncio.wait_for(crew.drained(), 30)
        await crew.finish()

    loop = asyncio.new_event_loop()  # not asyncio.run: it would leave this thread without a loop
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    assert failures == ["worker process 1 could not start (exit status 3)"]
    assert [(a.status, a.reason) for a in answers] == [("failed", "worker lost")]
