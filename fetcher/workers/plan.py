"""How many worker processes a run uses, and each worker's share of the run's limits.

Pure: no Scrapy. The fetch spider asks :func:`choose` once it has read the first
entries of its list, and gives each worker the settings of :func:`shares`.

The limits are split statically: a worker gets its share of CONCURRENT_REQUESTS and of
every per-host concurrency (CONCURRENT_REQUESTS_PER_DOMAIN, _PER_IP, DOWNLOAD_SLOTS), so
the run as a whole never has more in flight than they say; there are never more workers
than the smallest of them (a per-host limit of 1 means one worker). DOWNLOAD_DELAY is
stretched N times in each worker and AutoThrottle's target concurrency divided by N, so
the host sees the run's pace; ``auto`` picks one worker when either is set. The
bandwidth caps are not split: the workers share their token buckets (see
fetcher.transfer.ratelimit.SharedTokenBucket).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Protocol

#: ``auto`` starts workers only for a list of at least this many entries: a worker costs
#: about 0.5 s of start-up, and at about 1 ms of CPU per small file a list this long
#: repays it on two cores.
AUTO_MIN_ENTRIES = 2000
#: How long ``auto`` waits for those entries from a list that arrives slowly (standard
#: input, a list URL): a list that is not there within a second is not CPU-bound.
AUTO_WAIT = 1.0


def cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_workers(value: Any) -> int | None:
    """FETCHER_WORKERS: a whole number of at least 1, or ``auto`` (None)."""
    if value is None or str(value).strip().lower() in ("auto", ""):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1:
        raise ValueError(f"FETCHER_WORKERS must be 'auto' or a whole number of at least 1, not {value!r}")
    return number


class Settings(Protocol):
    """What is read of Scrapy's settings here (scrapy.settings.BaseSettings)."""

    def __iter__(self) -> Any: ...
    def get(self, name: str, default: Any = None) -> Any: ...
    def getint(self, name: str, default: int = 0) -> int: ...
    def getfloat(self, name: str, default: float = 0.0) -> float: ...
    def getbool(self, name: str, default: bool = False) -> bool: ...
    def getdict(self, name: str) -> dict[str, Any]: ...
    def getpriority(self, name: str) -> int | None: ...


#: The run's own outputs, never a worker's: its feed, its log, its stats dump, its progress.
_RUN_ONLY = frozenset({"FEEDS", "FEED_URI", "FEED_FORMAT", "LOG_FILE", "LOG_STDOUT", "LOG_ENABLED", "STATS_DUMP",
                       "FETCHER_PROGRESS", "FETCHER_WORKERS", "FETCHER_WORKER_CHANNEL", "FETCHER_SHARED_LIMITS"})
_CMDLINE = 40  # scrapy.settings.SETTINGS_PRIORITIES["cmdline"]: -s, -L, -O and Scrapyd's job settings


@dataclass(frozen=True)
class Limits:
    """The run's concurrency limits, as Scrapy's settings give them."""

    total: int  # CONCURRENT_REQUESTS
    per_domain: int
    per_ip: int  # 0: per domain
    slots: dict[str, dict[str, Any]]  # DOWNLOAD_SLOTS
    delay: float  # DOWNLOAD_DELAY
    autothrottle: bool
    target_concurrency: float  # AUTOTHROTTLE_TARGET_CONCURRENCY
    max_pending: int  # FETCHER_MAX_PENDING, resolved

    @classmethod
    def of(cls, settings: Settings, max_pending: int) -> Limits:
        return cls(
            total=settings.getint("CONCURRENT_REQUESTS"), per_domain=settings.getint("CONCURRENT_REQUESTS_PER_DOMAIN"),
            per_ip=settings.getint("CONCURRENT_REQUESTS_PER_IP"), slots=settings.getdict("DOWNLOAD_SLOTS"),
            delay=settings.getfloat("DOWNLOAD_DELAY"), autothrottle=settings.getbool("AUTOTHROTTLE_ENABLED"),
            target_concurrency=settings.getfloat("AUTOTHROTTLE_TARGET_CONCURRENCY"), max_pending=max_pending)

    def most_workers(self) -> int:
        """The most workers that can each get at least one of every concurrency limit."""
        per_host = self.per_ip or self.per_domain
        smallest = [self.total, per_host, *(int(s["concurrency"]) for s in self.slots.values() if "concurrency" in s)]
        return max(1, min(smallest))


@dataclass(frozen=True)
class Plan:
    workers: int
    why: str  # said in the log when it is not the obvious answer


def choose(setting: int | None, limits: Limits, *, entries: int, kind: str, scrapyd: bool = False,
           available: int | None = None) -> Plan:
    """How many workers: *setting* (None: auto), given how many *entries* of the list were
    read within AUTO_WAIT (up to AUTO_MIN_ENTRIES) and its *kind* ("list", "inline" or "queue")."""
    if kind != "list":
        if setting is not None and setting > 1:
            return Plan(1, f"FETCHER_WORKERS={setting} is for a list: "
                        + ("each queue worker is one process (start more of them)" if kind == "queue"
                           else "-a urls= runs in one process"))
        return Plan(1, "")
    most = limits.most_workers()
    if setting is not None:
        if setting > most:
            return Plan(most, f"FETCHER_WORKERS={setting} lowered to {most}: the concurrency limits "
                        f"(CONCURRENT_REQUESTS, per host, DOWNLOAD_SLOTS) allow no more workers")
        return Plan(setting, "")
    # Scrapyd runs several jobs per core already (max_proc_per_cpu); a host's pace is one process's;
    # a short list, or one arriving slowly, does not repay a worker's start-up.
    if scrapyd or limits.delay or limits.autothrottle or entries < AUTO_MIN_ENTRIES:
        return Plan(1, "")
    return Plan(max(1, min(available or cores(), most)), "")


def share(total: int, n: int, i: int) -> int:
    """Worker *i*'s share of *total* among *n* (the first ones take the remainder)."""
    return total // n + (i < total % n)


def shares(limits: Limits, n: int, i: int) -> dict[str, str]:
    """Worker *i*'s settings (as ``-s`` values) for its share of the run's limits."""
    own: dict[str, str] = {
        "CONCURRENT_REQUESTS": str(share(limits.total, n, i)),
        "CONCURRENT_REQUESTS_PER_DOMAIN": str(share(limits.per_domain, n, i)),
        "CONCURRENT_REQUESTS_PER_IP": str(share(limits.per_ip, n, i)),
        "FETCHER_MAX_PENDING": str(max(1, limits.max_pending // n)),
        "DOWNLOAD_DELAY": repr(limits.delay * n),
        "AUTOTHROTTLE_TARGET_CONCURRENCY": repr(max(limits.target_concurrency / n, 0.1)),
    }
    if limits.slots:
        slots = {}
        for key, slot in limits.slots.items():
            slot = dict(slot)
            if "concurrency" in slot:
                slot["concurrency"] = share(int(slot["concurrency"]), n, i)
            if slot.get("delay"):
                slot["delay"] = float(slot["delay"]) * n
            slots[key] = slot
        own["DOWNLOAD_SLOTS"] = json.dumps(slots)
    return own


def worker_argv(spider: str, settings: Settings, own: dict[str, str]) -> list[str]:
    """A worker's command line: ``scrapy crawl SPIDER -a list=-`` (its entries come on its
    standard input) with the run's command-line settings but for the run's own outputs, and
    *own* (its share of the limits, its channel)."""
    passed = {name: settings.get(name) for name in settings if settings.getpriority(name) == _CMDLINE
              and name not in _RUN_ONLY and isinstance(settings.get(name), str)}
    argv = [sys.executable, "-m", "scrapy", "crawl", spider, "-a", "list=-"]
    for name, value in {**passed, **own}.items():
        argv += ["-s", f"{name}={value}"]
    return argv


def worker_env() -> dict[str, str]:
    """A worker's environment: the run's, and its import path (a Scrapyd job's egg is on it)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
