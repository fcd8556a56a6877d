"""Bandwidth caps (FETCHER_MAX_RATE, FETCHER_MAX_RATE_PER_HOST): the token bucket on a fake
clock, then real crawls against the test origin, timed by the records' finished_at."""

from __future__ import annotations

import heapq
import re
from datetime import datetime
from typing import Any

import pytest
from scrapy import Request
from scrapy.settings import Settings

from fetcher.config import Config
from fetcher.exceptions import StartupError
from fetcher.transfer.limits import TransferLimits
from fetcher.transfer.ratelimit import MIN_BURST, TokenBucket, parse_rate
from tests.conftest import Fetch, Run
from tests.origin import Origin, expected_digest

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB  # what Twisted reads from a socket at once


# -- the bucket, on a fake clock ---------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "burst"), [
    (1 * MiB, 128 * KiB),  # 1/8 s of the rate
    (8 * MiB, 1 * MiB),
    (100 * KiB, MIN_BURST),  # never less than one socket read
    (1, MIN_BURST),
])
def test_default_burst(rate: int, burst: int) -> None:
    assert TokenBucket(rate).burst == burst


# (charges as (seconds, bytes), the wait each returns) for a 1 MiB/s bucket with its 128 KiB burst.
_R = 1 * MiB
CASES: dict[str, tuple[list[tuple[float, int]], list[float]]] = {
    "within the burst": ([(0, 64 * KiB), (0, 64 * KiB)], [0, 0]),
    "past the burst, the debt": ([(0, 128 * KiB), (0, 64 * KiB)], [0, 64 * KiB / _R]),
    "the debt paid back in time": ([(0, 192 * KiB), (64 * KiB / _R, 0)], [64 * KiB / _R, 0]),
    "a debt grows with each chunk": ([(0, 128 * KiB), (0, 64 * KiB), (0, 64 * KiB)], [0, 64 * KiB / _R, 128 * KiB / _R]),
    "an idle bucket fills up to the burst only": ([(0, 0), (10, 128 * KiB + 1 * MiB)], [0, 1.0]),
    "at exactly the rate, no wait": ([(0, 128 * KiB)] + [(0.0625 * i, 64 * KiB) for i in range(1, 9)], [0] * 9),
    "a debt of one byte is waited for": ([(0, 128 * KiB + 1)], [1 / _R]),
    "a clock going back refills nothing": ([(5, 128 * KiB), (4, 64 * KiB)], [0, 64 * KiB / _R]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_take(case: str) -> None:
    charges, waits = CASES[case]
    bucket = TokenBucket(_R)
    assert [bucket.take(n, now) for now, n in charges] == pytest.approx(waits)


def _simulate(rate: float, readers: int, seconds: float, late: float = 0.001, read: float = 20e-6) -> list[int]:
    """Readers sharing one bucket as the handler drives them, in one event loop: a
    read of a chunk takes *read* seconds; the reader charges it and reads again, or
    after the wait plus *late* (a timer's lateness); the socket always has a chunk
    ready. The bytes each got in *seconds*."""
    bucket = TokenBucket(rate)
    got = [0] * readers
    ready = [(0.0, i) for i in range(readers)]
    clock = 0.0  # one loop: reads do not overlap
    while ready:
        due, i = heapq.heappop(ready)
        clock = max(clock, due) + read
        if clock >= seconds:
            continue
        got[i] += CHUNK
        wait = bucket.take(CHUNK, clock)
        heapq.heappush(ready, (clock + (wait + late if wait else 0.0), i))
    return got


@pytest.mark.parametrize("readers", [1, 4, 8])
@pytest.mark.parametrize("rate", [256 * KiB, 2 * MiB, 50 * MiB, 200 * MiB])
def test_the_rate_holds_over_30_s(rate: int, readers: int) -> None:
    got = _simulate(rate, readers, 30.0)
    achieved = sum(got) / 30.0
    assert rate * 0.98 <= achieved <= rate * 1.01 + (TokenBucket(rate).burst + readers * CHUNK) / 30.0
    assert min(got) >= 0.95 * max(got)  # each reader pauses by itself, in turn: shares come out even


@pytest.mark.parametrize("rate", [0, -1, float("inf"), float("nan")])
def test_a_bucket_needs_a_positive_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(rate)


@pytest.mark.parametrize(("value", "rate"), [
    (None, 0), ("", 0), (0, 0), ("0", 0), (1048576, MiB), ("1048576", MiB), (2.5, 2.5), ("1e6", 1e6),
    ("512K", 512 * KiB), ("512k", 512 * KiB), ("2M", 2 * MiB), ("1.5m", 1.5 * MiB), ("1G", 1024 * MiB),
])
def test_parse_rate(value: Any, rate: float) -> None:
    assert parse_rate("FETCHER_MAX_RATE", value) == rate


@pytest.mark.parametrize("value", ["-1", -1, "fast", "1 MiB/s", "inf", "nan", float("inf"), True, "2T", "1,000"])
def test_parse_rate_refuses(value: Any) -> None:
    with pytest.raises(ValueError, match="^FETCHER_MAX_RATE must be"):
        parse_rate("FETCHER_MAX_RATE", value)


# -- which buckets a transfer gets ------------------------------------------------------------------


class _Downloader:
    """What _TransferLimits asks of Scrapy's downloader: its slot key (the host here)."""

    def get_slot_key(self, request: Request) -> str:
        return request.meta.get("download_slot") or request.url.split("/")[2].split(":")[0]


def _limits(**settings: Any) -> TransferLimits:
    s = Settings({"CONCURRENT_REQUESTS": 4, "CONCURRENT_REQUESTS_PER_DOMAIN": 2, **settings})
    return TransferLimits(s, Config.from_settings(s))


def test_no_cap_no_bucket() -> None:
    limits = _limits()
    assert limits.buckets(Request("http://a.test/x"), _Downloader()) is None  # type: ignore[arg-type]
    assert limits._rate_total is None and limits._rate_slots == {}


def test_buckets_are_shared_by_the_crawl_and_by_slot() -> None:
    d: Any = _Downloader()
    limits = _limits(FETCHER_MAX_RATE="4M", FETCHER_MAX_RATE_PER_HOST="1M")
    a1, a2 = (limits.buckets(Request(f"http://a.test/{n}"), d) for n in (1, 2))
    b = limits.buckets(Request("http://b.test/1"), d)
    slot = limits.buckets(Request("http://b.test/2", meta={"download_slot": "a.test"}), d)
    assert a1 is not None and b is not None and slot is not None
    assert a1 == a2 == slot and a1[0] is b[0]  # one crawl-wide bucket; one per slot key
    assert a1[1] is not b[1] and a1[1].rate == MiB and a1[0].rate == 4 * MiB
    only_global = _limits(FETCHER_MAX_RATE=1000)
    assert only_global.buckets(Request("http://a.test/1"), d) == only_global.buckets(Request("http://b.test/1"), d)


def test_a_bad_cap_is_an_error_not_no_cap() -> None:
    with pytest.raises(StartupError, match="FETCHER_MAX_RATE_PER_HOST"):
        _limits(FETCHER_MAX_RATE_PER_HOST="-5")


# -- real crawls -------------------------------------------------------------------------------------


def _finished(run: Run, url: str) -> float:
    return datetime.fromisoformat(run.record(url)["finished_at"]).timestamp()


def _check(run: Run, urls: dict[str, tuple[str, int]]) -> None:
    assert run.returncode == 0, run.log[-3000:]
    for url, (name, size) in urls.items():
        record = run.record(url)
        assert record["status"] == "downloaded" and record["size"] == size, record
        assert record["checksum"] == expected_digest(name, size), record


def test_a_global_cap_holds_across_transfers(fetch: Fetch, origin: Origin) -> None:
    """FETCHER_MAX_RATE=1 MiB/s, three 2 MiB files at once: 6 MiB take at least 6 s less the burst.
    A 1 KiB file starts with them and ends at once: its record marks when the transfers began."""
    marker = f"{origin.url}/gen/1k/start-a.bin"
    files = {f"{origin.url}/gen/2m/cap{i}.bin": (f"cap{i}.bin", 2 * MiB) for i in range(3)}
    run = fetch("".join(f"{u}\n" for u in [marker, *files]), settings={"FETCHER_MAX_RATE": MiB})
    _check(run, files)
    took = sorted(_finished(run, u) - _finished(run, marker) for u in files)
    floor = (6 * MiB - TokenBucket(MiB).burst) / MiB  # 5.875 s
    assert floor - 0.4 <= took[-1] <= 3 * 6.0, took
    # Shared, not taken in turns (which would end them at about 2, 4 and 6 s). Not exactly
    # evenly: each transfer gets one socket read per turn, and reads differ in size.
    assert took[0] >= 0.5 * took[-1], took


def test_a_per_host_cap_holds_per_host(fetch: Fetch) -> None:
    """FETCHER_MAX_RATE_PER_HOST=1 MiB/s: three 2 MiB files from one host share its 1 MiB/s;
    a 2 MiB file from another host gets a 1 MiB/s of its own (about 2 s), not a share of it."""
    with Origin(host="127.0.0.2").start() as busy, Origin(host="127.0.0.3").start() as other:
        markers = [f"{busy.url}/gen/1k/start-b.bin", f"{other.url}/gen/1k/start-c.bin"]
        crowded = {f"{busy.url}/gen/2m/host{i}.bin": (f"host{i}.bin", 2 * MiB) for i in range(3)}
        alone = {f"{other.url}/gen/2m/alone.bin": ("alone.bin", 2 * MiB)}
        run = fetch("".join(f"{u}\n" for u in [*markers, *crowded, *alone]),
                    settings={"FETCHER_MAX_RATE_PER_HOST": "1M"})
    _check(run, {**crowded, **alone})
    began = min(_finished(run, u) for u in markers)
    crowded_took = max(_finished(run, u) for u in crowded) - began
    alone_took = _finished(run, next(iter(alone))) - began
    burst = TokenBucket(MiB).burst
    assert (6 * MiB - burst) / MiB - 0.4 <= crowded_took <= 3 * 6.0, crowded_took
    # Capped itself (at least 2 MiB less the burst at 1 MiB/s), and not slowed by the other host:
    # sharing its bucket would take about 8 s.
    assert (2 * MiB - burst) / MiB - 0.3 <= alone_took <= 4.0, alone_took


def test_a_paused_transfer_is_not_stalled(fetch: Fetch, origin: Origin) -> None:
    """At 64 KiB/s each 64 KiB read is followed by a pause of about 1 s, longer than
    FETCHER_STALL_TIMEOUT=0.5: the pause must not count as a stall."""
    url = f"{origin.url}/gen/256k/paused.bin"
    run = fetch(f"{url}\n", settings={"FETCHER_MAX_RATE": "64K", "FETCHER_STALL_TIMEOUT": 0.5, "RETRY_TIMES": 0})
    _check(run, {url: ("paused.bin", 256 * KiB)})
    assert run.record(url)["attempts"] == 1


def test_a_transfer_ended_while_paused(fetch: Fetch, origin: Origin) -> None:
    """FETCHER_MAX_TIME ends a capped transfer in the middle of a pause: it fails at once,
    with its reason, and no pending resume touches it afterwards."""
    url = f"{origin.url}/gen/64m/slowpoke.bin"
    run = fetch(f"{url}\n", settings={"FETCHER_MAX_RATE": "64K", "FETCHER_MAX_TIME": 1.5, "RETRY_TIMES": 0})
    assert run.returncode == 1
    record = run.record(url)
    assert record["status"] == "failed" and "FETCHER_MAX_TIME" in record["error"], record
    assert "Traceback" not in run.log and "Unhandled" not in run.log, run.log[-3000:]
    assert origin.stats.bytes_by_path["/gen/64m/slowpoke.bin"] < 32 * MiB  # closed, not drained


@pytest.mark.parametrize("setting", [{"FETCHER_MAX_RATE": "fast"}, {"FETCHER_MAX_RATE_PER_HOST": "-1"},
                                     {"FETCHER_STALL_TIMEOUT": "abc"}, {"FETCHER_MAX_TIME": "-2"}],
                         ids=["not a number", "negative", "bad stall timeout", "negative max time"])
def test_a_bad_transfer_setting_stops_the_run(fetch: Fetch, origin: Origin, setting: dict[str, str]) -> None:
    run = fetch(f"{origin.url}/gen/1k/never-capped.bin\n", settings=setting)
    assert run.returncode != 0
    assert re.search(r"ERROR: Cannot start: " + re.escape(next(iter(setting))), run.log), run.log[-3000:]
    assert "Traceback" not in run.log, run.log[-3000:]
    assert origin.stats.hits == 0  # nothing was fetched, with or without a cap
