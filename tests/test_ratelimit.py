"""Bandwidth caps (FETCHER_MAX_RATE, FETCHER_MAX_RATE_PER_HOST): the token bucket on a fake clock."""

from __future__ import annotations

import heapq
from typing import Any

import pytest

from fetcher.ratelimit import MIN_BURST, TokenBucket, parse_rate

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
