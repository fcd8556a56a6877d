"""The Redis work queue, against real redis-server processes on free loopback
ports: dedup, take/ack, workers splitting work, leases and heartbeats, the
dead-letter rule, status, records, a million entries, passwords and errors."""

from __future__ import annotations

import json
import logging
import resource
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from fetcher.queue.stream import (
    DEFAULT_QUEUE,
    Delivery,
    QueueUnavailable,
    RedisQueue,
    is_queue_url,
    parse_queue_url,
)
from tests.redis_server import RedisServer, free_port

_T = TypeVar("_T")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    yield srv
    srv.stop()


@pytest.fixture
def queue_url(server: RedisServer) -> str:
    """A fresh queue for each test."""
    return server.url(f"t-{uuid.uuid4().hex[:10]}")


@pytest.fixture
def make(queue_url: str) -> Iterator[Callable[..., RedisQueue]]:
    """Workers on the test's queue, closed at the end (without releasing: a
    dead worker's entries must not come back early)."""
    made: list[RedisQueue] = []

    def factory(consumer: str, **kwargs: object) -> RedisQueue:
        q = RedisQueue(queue_url, consumer=consumer, **kwargs)  # type: ignore[arg-type]
        made.append(q)
        return q

    yield factory
    for q in made:
        q._redis.close()


def poll(fn: Callable[[], _T], timeout: float, what: str, interval: float = 0.05) -> _T:
    """fn() until truthy; fails after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def entries(*urls: str) -> list[tuple[str, str]]:
    return [(u, u) for u in urls]


# -- URLs ------------------------------------------------------------------

def test_parse_queue_url() -> None:
    assert parse_queue_url("redis://localhost") == ({"host": "localhost", "port": 6379, "db": 0}, DEFAULT_QUEUE)
    kwargs, name = parse_queue_url("redis://:p%40ss%23word@10.0.0.5:7000/3?queue=big-run_2.x")
    assert kwargs == {"host": "10.0.0.5", "port": 7000, "db": 3, "password": "p@ss#word"}
    assert name == "big-run_2.x"
    kwargs, _ = parse_queue_url("rediss://alice:pw@[::1]:6380/")
    assert kwargs == {"host": "::1", "port": 6380, "db": 0, "username": "alice", "password": "pw", "ssl": True}
    for bad in ["http://host/0", "redis:///0", "redis://host/abc", "redis://host:99999/0",
                "redis://host/0?queue=", "redis://host/0?queue=a{b}", "redis://host/0?qeue=x",
                "redis://host/0?queue=a&queue=b", "redis://:topsecret@host:port/0"]:
        with pytest.raises(ValueError) as info:
            parse_queue_url(bad)
        assert "topsecret" not in str(info.value)
    assert is_queue_url("redis://h") and is_queue_url("REDISS://h")
    assert not is_queue_url("urls.txt") and not is_queue_url("https://host/list.txt")


def test_bad_arguments(queue_url: str) -> None:
    with pytest.raises(ValueError):
        RedisQueue(queue_url, lease=0)
    with pytest.raises(ValueError):
        RedisQueue(queue_url, max_deliveries=0)


# -- enqueue, take, ack -----------------------------------------------------

def test_enqueue_counts_duplicates(make: Callable[..., RedisQueue]) -> None:
    q = make("A")
    text_b = "https://h/b\thttps://mirror/b\n  out=x/b.iso\n  header=X-Token: 1"
    assert q.enqueue([("https://h/a", "https://h/a"), ("https://h/b", text_b), ("https://h/a", "https://h/a")]) \
        == (2, 1)
    assert q.enqueue(entries("https://h/a", "https://h/c")) == (1, 1)  # across calls
    # across batch boundaries (batch=2) and within one
    assert q.enqueue(entries("https://h/d", "https://h/d", "https://h/e", "https://h/d", "https://h/b"),
                     batch=2) == (2, 3)
    assert q.enqueue([]) == (0, 0)
    assert q.status().waiting == 5
    taken = q.take(10)
    assert [d.url for d in taken] == ["https://h/a", "https://h/b", "https://h/c", "https://h/d", "https://h/e"]
    assert taken[1].text == text_b  # options kept as given
    assert all(d.deliveries == 1 for d in taken)


def test_take_and_ack(make: Callable[..., RedisQueue]) -> None:
    q = make("A")
    q.check()
    assert q.drained() and q.take(5) == []
    q.enqueue(entries(*(f"https://h/{i}" for i in range(5))))
    assert not q.drained()
    first = q.take(2)
    assert [d.url for d in first] == ["https://h/0", "https://h/1"]
    assert isinstance(first[0], Delivery) and first[0].text == "https://h/0"
    rest = q.take(10)
    assert [d.url for d in rest] == ["https://h/2", "https://h/3", "https://h/4"]
    assert q.take(10) == []
    for d in first + rest:
        assert not q.drained()
        q.record(d.url, {"url": d.url, "status": "downloaded"})
        q.ack(d.id)
    assert q.drained()
    assert q.status().waiting == 0 and q.status().done == 5
    assert q.enqueue(entries("https://h/0")) == (0, 1)  # "seen" outlives the ack


def test_two_consumers_split_without_overlap(make: Callable[..., RedisQueue]) -> None:
    a, b = make("A"), make("B")
    urls = [f"https://h/{i}" for i in range(200)]
    a.enqueue(entries(*urls))
    got: dict[str, list[str]] = {"A": [], "B": []}
    while True:
        batch_a, batch_b = a.take(7), b.take(5)
        if not batch_a and not batch_b:
            break
        for q, batch in ((a, batch_a), (b, batch_b)):
            for d in batch:
                got[q.consumer].append(d.url)
                q.ack(d.id)
    assert got["A"] and got["B"]
    assert not set(got["A"]) & set(got["B"])
    assert sorted(got["A"] + got["B"]) == sorted(urls)
    assert a.drained() and b.drained()


# -- leases, heartbeats, dead letters --------------------------------------

def test_dead_consumer_entries_are_reclaimed_after_the_lease(
        make: Callable[..., RedisQueue], caplog: pytest.LogCaptureFixture) -> None:
    lease = 1.0
    dead, alive = make("dead", lease=lease), make("alive", lease=lease)
    dead.enqueue(entries("https://h/1", "https://h/2", "https://h/3"))
    start = time.monotonic()
    held = dead.take(2)
    assert len(held) == 2
    assert [d.url for d in alive.take(10)] == ["https://h/3"]  # not the dead one's: its lease runs
    assert alive.take(10) == []
    reclaimed = poll(lambda: alive.take(10), 3 * lease + 10, "the dead worker's entries")
    elapsed = time.monotonic() - start
    assert elapsed >= lease - 0.01, f"reclaimed after {elapsed:.3f} s, before the {lease} s lease"
    assert sorted(d.url for d in reclaimed) == ["https://h/1", "https://h/2"]
    assert {d.id for d in reclaimed} == {d.id for d in held}
    assert all(d.deliveries == 2 for d in reclaimed)
    st = alive.status()
    assert st.in_flight["dead"] == 0 and st.in_flight["alive"] == 3
    # The "dead" worker was only slow: its heartbeat learns it lost them.
    with caplog.at_level(logging.WARNING, logger="fetcher.queue.stream"):
        dead.heartbeat()
    assert "taken over" in caplog.text
    assert dead._held == set()


def test_heartbeat_keeps_a_long_download(make: Callable[..., RedisQueue]) -> None:
    lease = 1.5
    worker, other = make("worker", lease=lease), make("other", lease=lease)
    worker.enqueue(entries("https://h/big"))
    (delivery,) = worker.take(1)
    hold_until = time.monotonic() + 3 * lease  # three leases: long past a lease
    while time.monotonic() < hold_until:
        worker.heartbeat()
        assert other.take(5) == [], "a heartbeating worker's entry was taken over"
        time.sleep(0.1)  # pace; heartbeats come far more often than lease/3
    worker.heartbeat()
    last_beat = time.monotonic()
    assert worker.status().in_flight["worker"] == 1
    (again,) = poll(lambda: other.take(5), 3 * lease + 10, "the entry once heartbeats stop")
    assert time.monotonic() - last_beat >= lease - 0.01
    assert again.id == delivery.id and again.deliveries == 2


def test_dead_letter_after_max_deliveries(make: Callable[..., RedisQueue]) -> None:
    lease = 0.5
    text = "https://h/killer\n  out=k.bin"
    w1, w2, w3 = (make(name, lease=lease, max_deliveries=2) for name in ("w1", "w2", "w3"))
    w1.enqueue([("https://h/killer", text), ("https://h/fine", "https://h/fine")])
    first = w1.take(1)
    assert [(d.url, d.deliveries) for d in first] == [("https://h/killer", 1)]
    (fine,) = w3.take(1)
    w3.record(fine.url, {"url": fine.url, "status": "downloaded"})
    w3.ack(fine.id)
    (second,) = poll(lambda: w2.take(5), 3 * lease + 10, "the first redelivery")
    assert (second.url, second.deliveries) == ("https://h/killer", 2)
    # w2 dies too: the third delivery would exceed max_deliveries=2.
    def dead_lettered() -> bool:
        assert w3.take(5) == [], "an entry past max_deliveries was handed out"
        return w3.drained()
    poll(dead_lettered, 3 * lease + 10, "the dead-lettering")
    st = w3.status()
    assert (st.waiting, st.done, st.failed, st.dead) == (0, 1, 1, 1)
    records = {r["url"]: r for r in w3.records()}
    record = records["https://h/killer"]
    assert record["status"] == "failed"
    assert record["error"] == ("dead-lettered: delivered 2 times without an acknowledgement "
                               "(a worker died on it each time)")
    assert record["entry"] == text and record["attempts"] == 2 and record["finished_at"]


def test_close_hands_back_unfinished_entries(make: Callable[..., RedisQueue]) -> None:
    leaving, staying = make("leaving", lease=60), make("staying", lease=60)
    leaving.enqueue(entries("https://h/1", "https://h/2", "https://h/3"))
    taken = leaving.take(3)
    leaving.ack(taken[0].id)
    leaving.close()
    back = staying.take(10)  # at once, not after the 60 s lease
    assert sorted(d.url for d in back) == ["https://h/2", "https://h/3"]
    assert all(d.deliveries == 1 for d in back)  # a clean stop is not a death
    assert staying.status().in_flight == {"leaving": 0, "staying": 2}
    for d in back:
        staying.ack(d.id)
    staying.close()
    assert make("checker").drained()


# -- status and records ----------------------------------------------------

def test_status(make: Callable[..., RedisQueue]) -> None:
    lease = 0.5
    a, b = make("A", lease=lease), make("B", lease=lease)
    a.enqueue(entries(*(f"https://h/{i}" for i in range(10))))
    ta, tb = a.take(3), b.take(2)
    a.heartbeat()
    before_beat = time.monotonic()
    b.heartbeat()
    after_beat = time.monotonic()
    for d, status in zip(ta, ["downloaded", "failed", "cached"], strict=True):
        a.record(d.url, {"url": d.url, "status": status})
        a.ack(d.id)
    st = a.status()
    assert st.waiting == 5
    assert st.in_flight == {"A": 0, "B": 2}
    assert (st.done, st.failed, st.dead) == (2, 1, 0)
    assert set(st.heartbeats) == {"A", "B"}
    assert all(age is not None and 0 <= age < 3 * lease for age in st.heartbeats.values())
    a.record(ta[1].url, {"url": ta[1].url, "status": "downloaded"})  # a retry that succeeded
    a.record(ta[0].url, {"url": ta[0].url, "status": "uptodate"})
    st = a.status()
    assert (st.done, st.failed) == (3, 0)
    # B stops heartbeating: its age grows, then (after three leases) it has none.
    def b_age() -> float | None:
        age = a.status().heartbeats["B"]
        return age if age is not None and age >= lease else None
    age = poll(b_age, 3 * lease + 10, "B's heartbeat to age")
    assert age is not None and age <= time.monotonic() - before_beat + 0.01

    def b_gone() -> bool:
        a.heartbeat()
        return a.status().heartbeats["B"] is None
    poll(b_gone, 3 * lease + 10, "B's heartbeat to expire")
    assert time.monotonic() - after_beat >= 3 * lease - 0.01
    assert a.status().heartbeats["A"] is not None
    # B is gone but holds two entries: A's next take reclaims them.
    taken = a.take(5)  # reclaimed ones first, then new ones
    assert sorted(d.url for d in taken[:2]) == sorted(d.url for d in tb)
    assert [d.deliveries for d in taken] == [2, 2, 1, 1, 1]


def test_dead_workers_are_forgotten(make: Callable[..., RedisQueue]) -> None:
    lease = 0.3
    gone, idle, here = make("gone", lease=lease), make("idle", lease=lease), make("here", lease=lease)
    gone.enqueue(entries("https://h/1"))
    (d,) = gone.take(1)
    gone.ack(d.id)  # holds nothing, then dies (no close)
    idle.heartbeat()  # a worker that never got anything, then dies
    here.heartbeat()
    assert set(here.status().in_flight) == {"gone", "idle", "here"}

    def forgotten() -> bool:
        here.heartbeat()
        here._prune_after = 0.0  # prune at every take, not once a lease
        here.take(1)
        return set(here.status().in_flight) == {"here"}
    poll(forgotten, 3 * lease + 10, "the dead workers to be forgotten", interval=0.1)


def test_records(make: Callable[..., RedisQueue]) -> None:
    a, b = make("A"), make("B")
    a.record("https://h/1", {"url": "https://h/1", "status": "failed", "error": "HTTP 503"})
    b.record("https://h/2", {"url": "https://h/2", "status": "downloaded", "path": "2", "size": 5})
    b.record("https://h/1", {"url": "https://h/1", "status": "downloaded", "path": "1", "size": 3})
    a.record("https://h/ü", {"url": "https://h/ü", "status": "cached", "note": "é"})
    got = sorted(a.records(), key=lambda r: r["url"])
    assert got == [
        {"url": "https://h/1", "status": "downloaded", "path": "1", "size": 3},
        {"url": "https://h/2", "status": "downloaded", "path": "2", "size": 5},
        {"url": "https://h/ü", "status": "cached", "note": "é"},
    ]
    assert (a.status().done, a.status().failed) == (3, 0)


# -- scale -----------------------------------------------------------------

def test_enqueue_a_million_streams(make: Callable[..., RedisQueue], server: RedisServer) -> None:
    q = make("producer")
    q.check()
    client = server.client()
    stream = f"fetcher:{{{q.name}}}:stream"
    seen_midway: list[int] = []
    n = 1_000_000

    def generate() -> Iterator[tuple[str, str]]:
        for i in range(n):
            if i == n // 2:  # entries are already in Redis: enqueue streams, it does not collect
                seen_midway.append(int(client.xlen(stream)))
            url = f"https://files.example.com/data/{i % 1000:03d}/part-{i:07d}.bin"
            yield url, (url if i % 10 else f"{url}\n  out=parts/{i}.bin")
        yield "https://files.example.com/data/000/part-0000000.bin", "dup"

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    added, dups = q.enqueue(generate())
    took = time.perf_counter() - start
    rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    print(f"\nenqueue of {n:,} entries: {took:.2f} s ({n / took:,.0f}/s), peak RSS growth {rss_growth_mib:.1f} MiB")
    try:
        assert (added, dups) == (n, 1)
        assert took < 60
        assert seen_midway and seen_midway[0] >= n // 2 - 1000
        assert rss_growth_mib < 100  # the entries themselves would take several hundred MiB
        assert q.status().waiting == n
        (first,) = q.take(1)
        assert first.url.endswith("part-0000000.bin") and first.text.endswith("out=parts/0.bin")
    finally:
        client.unlink(stream, f"fetcher:{{{q.name}}}:seen")
        client.close()


# -- passwords and errors --------------------------------------------------

def test_password_protected_redis(tmp_path: Path) -> None:
    password = "pw-" + uuid.uuid4().hex
    srv = RedisServer(tmp_path, "--requirepass", password)
    try:
        q = RedisQueue(srv.url("secured", password=password), consumer="A")
        q.check()
        assert q.enqueue(entries("https://h/1")) == (1, 0)
        (d,) = q.take(1)
        q.record(d.url, {"url": d.url, "status": "downloaded"})
        q.ack(d.id)
        assert q.drained()
        q.close()

        wrong = RedisQueue(srv.url("secured", password="not-" + password), socket_timeout=5)
        with pytest.raises(QueueUnavailable) as info:
            wrong.check()
        message = str(info.value)
        assert "refused the password" in message and f"127.0.0.1:{srv.port}" in message
        for text in (message, repr(info.value), str(info.value.__cause__)):
            assert password not in text and "not-" + password not in text

        missing = RedisQueue(srv.url("secured"), socket_timeout=5)
        with pytest.raises(QueueUnavailable, match="requires a password"):
            missing.take(1)
    finally:
        srv.stop()


def test_connection_refused() -> None:
    port = free_port()  # nothing listens there
    q = RedisQueue(f"redis://:sekrit@127.0.0.1:{port}/0", socket_timeout=5)
    start = time.monotonic()
    with pytest.raises(QueueUnavailable) as info:
        q.check()
    assert time.monotonic() - start < 15
    assert "cannot reach Redis" in str(info.value) and f"127.0.0.1:{port}" in str(info.value)
    assert "sekrit" not in str(info.value)
    for call in (lambda: q.enqueue(entries("https://h/1")), lambda: q.take(1), q.heartbeat, q.status,
                 q.drained, lambda: list(q.records()), lambda: q.record("u", {}), lambda: q.ack("1-0")):
        with pytest.raises(QueueUnavailable):
            call()
    q.close()


def test_redis_lost_mid_enqueue(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path)
    read = 0
    try:
        q = RedisQueue(srv.url("lost"), socket_timeout=5)

        def generate() -> Iterator[tuple[str, str]]:
            nonlocal read
            for i in range(100_000):
                if i == 2500:
                    srv.stop()
                read += 1
                yield f"https://h/{i}", f"https://h/{i}"

        with pytest.raises(QueueUnavailable, match="cannot reach Redis"):
            q.enqueue(generate())
        assert read <= 3000  # stopped at the first batch that failed
        start = time.monotonic()
        q.close()  # best effort: no error, no new wait for the lost Redis
        assert time.monotonic() - start < 1
    finally:
        srv.stop()


def test_a_dead_letter_carries_no_credentials(make: Callable[..., RedisQueue],
                                               caplog: pytest.LogCaptureFixture) -> None:
    lease = 0.5
    url = "https://kim:PASSWORDx9@h/killer"
    text = f"{url}\n  header=Authorization: Bearer TOKENx9"
    w1, w2 = (make(name, lease=lease, max_deliveries=1) for name in ("w1", "w2"))
    w1.enqueue([(url, text)])
    assert len(w1.take(1)) == 1  # w1 dies with it: the next delivery is past max_deliveries=1
    poll(lambda: w2.take(5) == [] and w2.drained(), 3 * lease + 10, "the dead-lettering")
    [record] = list(w2.records())
    shown = json.dumps(record) + caplog.text
    assert "PASSWORDx9" not in shown and "TOKENx9" not in shown, shown
    assert record["status"] == "failed" and record["url"] == "https://***@h/killer"
