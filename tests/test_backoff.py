"""Backoff delays and Retry-After parsing."""

from __future__ import annotations

from email.utils import formatdate

from fetcher.transfer.backoff import Backoff, retry_after_seconds


def test_retry_after_seconds_and_http_date() -> None:
    assert retry_after_seconds("3", now=1000.0) == 3.0
    now = 1_700_000_000.0
    assert retry_after_seconds(formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert retry_after_seconds(formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert retry_after_seconds("soon", now=now) is None
    assert retry_after_seconds(None, now=now) is None


def test_exponential_with_jitter_and_caps() -> None:
    b = Backoff(base=1.0, cap=8.0, retry_after_cap=20.0)
    for attempt, top in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (10, 8.0)]:
        for _ in range(50):
            assert top / 2 <= b.delay(attempt) <= top
    assert b.delay(1, retry_after=5.0) == 5.0
    assert b.delay(1, retry_after=500.0) == 20.0
