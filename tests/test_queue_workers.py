"""Many workers on one Redis queue: real redis-server, real `scrapy enqueue`, `scrapy crawl` workers
and `scrapy queue`, against the test origin."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from scrapy.statscollectors import StatsCollector
from scrapy.utils.test import get_crawler

from fetcher.items import FetchItem
from fetcher.listing.urllist import Entry
from fetcher.spiders.fetch import FetchSpider
from tests.conftest import SCRAPY, Fetch
from tests.origin import Origin, expected_digest, parse_size
from tests.redis_server import RedisServer

# Short leases so that a killed worker's entries come back within seconds.
QUEUE = {"FETCHER_QUEUE_LEASE": "2", "FETCHER_QUEUE_IDLE": "2", "FETCHER_PROGRESS": "log"}


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def scrapy(fetch: Fetch, *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRAPY, *args], cwd=fetch.cwd, env=fetch.env(), input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def worker(fetch: Fetch, queue_url: str, store: Path, **settings: str) -> subprocess.Popen[str]:
    cmd = fetch.command("-a", f"list={queue_url}", settings={**QUEUE, "FILES_STORE": str(store), **settings})
    return subprocess.Popen(cmd, cwd=fetch.cwd, env=fetch.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def merged_manifest(fetch: Fetch, queue_url: str) -> list[dict]:
    out = fetch.cwd / "merged.jsonl"
    proc = scrapy(fetch, "queue", queue_url, "--manifest", str(out))
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


def queue_state(fetch: Fetch, queue_url: str) -> dict[str, int]:
    proc = scrapy(fetch, "queue", queue_url)
    assert proc.returncode == 0, proc.stderr
    state = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        if value.strip().isdigit():
            state[key] = int(value)
    return state


def test_three_workers_one_killed_nothing_lost(fetch: Fetch, origin: Origin, redis_server: RedisServer) -> None:
    u = origin.url
    names = [(f"/gen/3m/q-big{i}.bin", "?rate=3000000") for i in range(30)]
    names += [(f"/gen/16k/q-small{i}.bin", "") for i in range(470)]
    (fetch.cwd / "urls.txt").write_text("".join(f"{u}{path}{query}\n" for path, query in names))
    queue_url = redis_server.url("workers")
    enq = scrapy(fetch, "enqueue", queue_url, "urls.txt")
    assert enq.returncode == 0, enq.stderr
    assert "Enqueued 500 URLs" in enq.stderr
    store = fetch.cwd / "shared"
    # 8 transfers at once, 16 entries in progress (FETCHER_MAX_PENDING's floor: 2 x 8) per worker.
    workers = [worker(fetch, queue_url, store, CONCURRENT_REQUESTS="8", FETCHER_MAX_PENDING="16") for _ in range(3)]
    try:
        deadline = time.monotonic() + 60
        while origin.stats.hits < 150 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers[0].send_signal(signal.SIGKILL)
        codes = [w.wait(180) for w in workers[1:]]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    logs = [w.stderr.read() if w.stderr else "" for w in workers[1:]]
    assert codes == [0, 0], logs
    records = merged_manifest(fetch, queue_url)
    assert Counter(r["url"] for r in records) == Counter(f"{u}{p}{q}" for p, q in names)  # each exactly once
    host = u.removeprefix("http://")
    for path, query in names:
        record = next(r for r in records if r["url"] == f"{u}{path}{query}")
        assert record["status"] in ("downloaded", "uptodate"), record
        name, size = path.rsplit("/", 1)[1], parse_size(path.split("/")[2])
        assert record["checksum"] == expected_digest(name, size)
        assert (store / host / f"{path.lstrip('/')}{query}").stat().st_size == size
    # No complete body twice, except the entries the killed worker had in progress (at most its 16):
    # in flight, or complete but not yet recorded (a transfer's slot is free once its bytes are in,
    # before the file is renamed and recorded, so under load there can be more than its 8 transfers).
    full = Counter(r["path"] for r in origin.stats.snapshot().requests
                   if r["status"] == 200 and r["method"] == "GET")
    assert sum(n - 1 for n in full.values() if n > 1) <= 16, full.most_common(10)
    state = queue_state(fetch, queue_url)
    assert state["waiting"] == 0 and state["in flight"] == 0, state
    print(f"records per worker run: {sorted(Counter(r['run'] for r in records).values())}; "
          f"paths sent in full twice: {sum(n - 1 for n in full.values() if n > 1)}; lost: 0 of {len(names)}")


def test_enqueue_from_stdin_and_url_with_bad_lines_and_duplicates(fetch: Fetch, origin: Origin,
                                                                  redis_server: RedisServer) -> None:
    u = origin.url
    queue_url = redis_server.url()
    first = scrapy(fetch, "enqueue", queue_url, "-", stdin=f"{u}/gen/1k/e1.bin\nnot a url\n{u}/gen/1k/e1.bin\n")
    assert first.returncode == 1  # a bad line
    assert "line 2: not a valid http(s) URL" in first.stderr
    assert "Enqueued 1 URLs" in first.stderr and "1 already queued" in first.stderr
    origin.texts["enq-list"] = f"{u}/gen/1k/e1.bin\n{u}/gen/2k/e2.bin\n  out=two.bin\n"
    second = scrapy(fetch, "enqueue", queue_url, f"{u}/text/enq-list")
    assert second.returncode == 0, second.stderr
    assert "Enqueued 1 URLs" in second.stderr and "1 already queued" in second.stderr
    store = fetch.cwd / "store"
    run = worker(fetch, queue_url, store)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert (store / "two.bin").stat().st_size == 2048  # options travel with the entry
    records = {r["url"]: r for r in merged_manifest(fetch, queue_url)}
    assert records["not a url"]["status"] == "failed"
    assert records[f"{u}/gen/2k/e2.bin"]["status"] == "downloaded"
    assert origin.stats.hits_by_path["/gen/1k/e1.bin"] == 1


def test_an_entry_that_kills_its_workers_is_dead_lettered(fetch: Fetch, origin: Origin,
                                                          redis_server: RedisServer) -> None:
    u = origin.url
    queue_url = redis_server.url("dead")
    stall = f"{u}/gen/1m/poison.bin?stall_at=1000&stall_for=120&stall_times=0"  # stalls every time
    enq = scrapy(fetch, "enqueue", queue_url, "-", stdin=f"{stall}\n")
    assert enq.returncode == 0, enq.stderr
    store = fetch.cwd / "store"
    settings = {"FETCHER_QUEUE_MAX_DELIVERIES": "2", "FETCHER_STALL_TIMEOUT": "120", "CONCURRENT_REQUESTS": "1",
                "FETCHER_RESUME": "False"}  # each worker starts the poisoned file over, and stalls again
    for delivery in (1, 2):  # the worker dies on the poisoned entry each time
        w = worker(fetch, queue_url, store, **settings)
        deadline = time.monotonic() + 30
        while origin.stats.hits_by_path["/gen/1m/poison.bin"] < delivery and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(w.pid, signal.SIGKILL)
        w.wait(10)
    # Work enqueued later is not held up by it (entries a worker held when it died count a delivery too).
    assert scrapy(fetch, "enqueue", queue_url, "-", stdin=f"{u}/gen/1k/fine.bin\n").returncode == 0
    last = worker(fetch, queue_url, store, **settings)
    _, err = last.communicate(timeout=60)
    assert last.returncode == 0, err
    records = {r["url"]: r for r in merged_manifest(fetch, queue_url)}
    assert records[stall]["status"] == "failed" and "dead-lettered" in records[stall]["error"]
    assert records[f"{u}/gen/1k/fine.bin"]["status"] == "downloaded"
    assert origin.stats.hits_by_path["/gen/1m/poison.bin"] == 2  # not a third time
    assert queue_state(fetch, queue_url)["dead-lettered"] == 1


def test_redis_down_at_start_is_a_clear_error(fetch: Fetch, origin: Origin) -> None:
    with RedisServer() as server:
        queue_url = server.url()
    run = fetch(None, "-a", f"list={queue_url}")
    assert run.returncode == 1
    assert "Cannot use the queue" in run.log and "Traceback" not in run.log
    assert origin.stats.hits == 0


def test_redis_lost_mid_run_stops_taking_work_and_exits_non_zero(fetch: Fetch, origin: Origin) -> None:
    u = origin.url
    with RedisServer() as server:
        queue_url = server.url()
        listing = "".join(f"{u}/gen/2m/lost{i}.bin?rate=2000000\n" for i in range(20))
        assert scrapy(fetch, "enqueue", queue_url, "-", stdin=listing).returncode == 0
        w = worker(fetch, queue_url, fetch.cwd / "store", CONCURRENT_REQUESTS="2", FETCHER_MAX_PENDING="2")
        deadline = time.monotonic() + 30
        while origin.stats.hits < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()
        try:
            _, err = w.communicate(timeout=60)
        finally:
            if w.poll() is None:
                w.kill()
    assert w.returncode == 1
    assert "Lost the queue" in err and "Traceback" not in err
    assert origin.stats.hits < 20  # it stopped taking work


def test_a_worker_on_a_finished_store_records_uptodate_and_ends(fetch: Fetch, origin: Origin,
                                                                redis_server: RedisServer) -> None:
    u = origin.url
    listing = "".join(f"{u}/gen/4k/again{i}.bin\n" for i in range(30))
    store = fetch.cwd / "store"
    for name in ("first", "second"):  # a new queue each time: a queue hands out a URL once
        queue_url = redis_server.url(name)
        assert scrapy(fetch, "enqueue", queue_url, "-", stdin=listing).returncode == 0
        w = worker(fetch, queue_url, store)
        _, err = w.communicate(timeout=60)
        assert w.returncode == 0, err
    records = merged_manifest(fetch, queue_url)
    assert len(records) == 30 and {r["status"] for r in records} == {"uptodate"}
    assert origin.stats.hits == 30  # the second queue fetched nothing
    assert queue_state(fetch, queue_url)["in flight"] == 0


class _Acks:
    """The queue side of a worker, as far as the spider's bookkeeping goes."""

    def finished(self, url: str) -> None:
        pass


def test_a_queue_worker_keeps_no_memory_per_url() -> None:
    """A long-running worker hands 100,000 entries through: the spider's duplicate check (a
    set that grows with every URL) is for lists, and a queue's entries are unique already."""
    crawler = get_crawler(FetchSpider)
    crawler.stats = StatsCollector(crawler)
    spider = FetchSpider.from_crawler(crawler, list="redis://127.0.0.1:9/0?queue=q")
    spider._queue = _Acks()  # type: ignore[assignment]  # noqa: SLF001 - as start() sets it for a queue

    async def feed(n: int) -> None:
        for i in range(n):
            entry = await spider._admit(Entry(f"http://127.0.0.1:9/{i}.bin", i))  # noqa: SLF001
            assert isinstance(entry, Entry)  # admitted: start() yields its item
            spider._item_done(FetchItem(file_urls=[entry.url], fetcher_entries=[entry]))  # noqa: SLF001

    loop = asyncio.new_event_loop()  # not asyncio.run: it would leave this thread without a loop
    try:
        loop.run_until_complete(feed(1_000))  # warm: the first items allocate what every later one reuses
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        loop.run_until_complete(feed(100_000))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        loop.close()
    assert grown < 512 * 1024, f"{grown:,} bytes kept for 100,000 URLs"


def test_enqueue_shows_and_stores_no_credentials(fetch: Fetch, origin: Origin, redis_server: RedisServer) -> None:
    """A bad line and a failing list URL, both with credentials: neither `scrapy enqueue`'s
    output nor the queue's records (as `scrapy queue --manifest` writes them) hold them."""
    queue_url = redis_server.url()
    bad = f"http://kim:PASSWORDx9@127.0.0.1:{origin.port}/x.bin sha256=not-hex\n  header=Cookie: sid=TOKENx9\n"
    first = scrapy(fetch, "enqueue", queue_url, "-", stdin=bad)
    assert first.returncode == 1
    listed = scrapy(fetch, "enqueue", queue_url, f"http://mo:PASSWORDx9@127.0.0.1:{origin.port}/status/404",
                    "-s", "RETRY_TIMES=0")
    assert listed.returncode == 1 and "cannot fetch the list" in listed.stderr
    shown = json.dumps(merged_manifest(fetch, queue_url)) + first.stdout + first.stderr + listed.stderr
    assert "PASSWORDx9" not in shown and "TOKENx9" not in shown, shown
