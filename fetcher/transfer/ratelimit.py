"""Bandwidth caps as token buckets (FETCHER_MAX_RATE, FETCHER_MAX_RATE_PER_HOST).

Pure: no Scrapy, no reactor, no clock of its own (the caller passes ``now``), so
it is tested with a fake clock. The download handler charges every body chunk it
has received to its buckets and, when one says to wait, pauses reading the socket
for that long: bytes are never slept on nor held in memory, they wait in the
kernel's socket buffer and then TCP's window. The worker processes of one run
share their buckets (:class:`SharedTokenBucket`), so a cap holds for the run.

A bucket holds up to *burst* bytes of credit and refills at *rate* bytes a
second. A chunk is charged after it arrived, so the balance may go negative (a
debt); the caller must then wait for the debt to be paid back before it reads
more. Over any window of T seconds a bucket therefore lets through at most
``burst + rate * T`` bytes plus the chunks of readers that were already reading,
and over long windows the rate converges on the cap.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import re
import struct
from pathlib import Path

#: A bucket holds at least this much credit: one socket read (Twisted reads up to
#: 64 KiB at a time). With less, every read would overshoot the credit and pause.
MIN_BURST = 64 * 1024
#: ...and otherwise 1/8 s of the rate: enough to keep a transfer reading between
#: pauses, small enough that a one-second window stays within 1/8 of the cap (and a
#: 30-second one within 0.4 %).
BURST_SECONDS = 1 / 8

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_RATE = re.compile(r"\s*([+-]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmg]?)\s*", re.IGNORECASE)


class TokenBucket:
    """A cap of *rate* bytes a second with a burst of *burst* bytes (default: the larger
    of 1/8 s of the rate and 64 KiB). It starts full."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, *, burst: float | None = None, now: float = 0.0) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"a bucket's rate must be a positive number of bytes a second, not {rate!r}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(MIN_BURST, rate * BURST_SECONDS))
        self._tokens = self.burst
        self._last = now

    def take(self, n: int, now: float) -> float:
        """Charge *n* bytes that were received at *now*; the seconds the caller must wait
        before reading more: 0.0 when within the cap, else the time the debt takes to pay.

        The wait is the whole debt, however small, with no minimum pause: readers sharing
        a bucket then resume in the order they charged it, each when the debt up to its
        own charge is paid, which shares the rate evenly. (A floor of a few ms, to pause
        less often at high caps, lets the reader that happens to resume first spend the
        credit built up during the others' pauses: simulated at 50 MiB/s with 8 readers
        the smallest share fell to half the largest.)"""
        elapsed = now - self._last
        if elapsed > 0:  # a clock that goes back refills nothing
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._last = now
        self._tokens -= n
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate


class SharedTokenBucket(TokenBucket):
    """The same bucket shared by the worker processes of one run: its balance lives in a
    small file each of them maps (in a private folder the run made), changed under an
    ``flock``. ``now`` must be ``time.monotonic()``: one clock for every process."""

    __slots__ = ("_fd", "_map")
    _STATE = struct.Struct("=dd?")  # tokens, last, started

    def __init__(self, path: Path, rate: float, *, burst: float | None = None, now: float = 0.0) -> None:
        super().__init__(rate, burst=burst, now=now)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size < self._STATE.size:
            os.ftruncate(self._fd, self._STATE.size)  # zeros: not started (the first taker fills it)
        self._map = mmap.mmap(self._fd, self._STATE.size)

    def take(self, n: int, now: float) -> float:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            tokens, last, started = self._STATE.unpack_from(self._map)
            if started:
                self._tokens, self._last = tokens, last
            wait = super().take(n, now)
            self._STATE.pack_into(self._map, 0, self._tokens, self._last, True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return wait


def parse_rate(name: str, value: object) -> float:
    """A rate setting in bytes a second: a number, or one with a binary K/M/G suffix as
    aria2 and wget take it ("512K", "2M", "1.5m"). 0, empty or None: no cap (0.0).
    Anything else (negative, not a number, infinite) raises ValueError naming *name*."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, bool):  # a setting's value: one ValueError for every bad one
        raise ValueError(f"{name} must be a number of bytes a second, not {value!r}")  # noqa: TRY004
    if isinstance(value, (int, float)):
        rate = float(value)
    else:
        match = _RATE.fullmatch(str(value))
        if match is None:
            raise ValueError(f"{name} must be a number of bytes a second (e.g. 1048576, 512K or 2M), not {value!r}")
        rate = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"{name} must be 0 (no cap) or a positive number of bytes a second, not {value!r}")
    return rate
