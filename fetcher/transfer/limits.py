"""The transfer limits of one crawl, shared by its http and https handlers.

Scrapy enforces CONCURRENT_REQUESTS only for requests from its scheduler (the
pipeline's do not come from there), and with the asyncio reactor its downloader
starts every request queued in one loop iteration, whatever
CONCURRENT_REQUESTS_PER_DOMAIN says. Streamed transfers are bounded here
instead: first by downloader slot, so that one waiting behind its host holds no
global slot, then in all.

The bandwidth caps live here too: one token bucket for the crawl
(FETCHER_MAX_RATE) and one per downloader slot (FETCHER_MAX_RATE_PER_HOST),
none when unset; in a run's worker processes, buckets they all share.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import resource
import weakref
from pathlib import Path
from time import monotonic
from typing import TYPE_CHECKING

from fetcher.config import Config
from fetcher.transfer.ratelimit import SharedTokenBucket, TokenBucket

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.core.downloader import Downloader
    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings

logger = logging.getLogger(__name__)

_RESERVED_FDS = 64  # descriptors Scrapy, the reactor, logs and the manifest need besides transfers


class TransferLimits:
    """Concurrency per slot and in all, and the bandwidth caps, for streamed transfers."""

    _by_crawler: weakref.WeakKeyDictionary[Crawler, TransferLimits] = weakref.WeakKeyDictionary()

    def __init__(self, settings: BaseSettings, config: Config) -> None:
        self.total = asyncio.Semaphore(_fitting_concurrency(settings.getint("CONCURRENT_REQUESTS")))
        self._per_slot = settings.getint("CONCURRENT_REQUESTS_PER_IP") or settings.getint(
            "CONCURRENT_REQUESTS_PER_DOMAIN")
        self._slot_settings = settings.getdict("DOWNLOAD_SLOTS")
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._host_rate = config.max_rate_per_host
        self._shared = Path(config.shared_limits) if config.shared_limits else None
        self._rate_total = self._bucket("total", config.max_rate) if config.max_rate else None
        self._rate_slots: dict[str, TokenBucket] = {}

    @classmethod
    def of(cls, crawler: Crawler) -> TransferLimits:
        """The crawl's limits (StartupError for a bad setting, from fetcher.config)."""
        if crawler not in cls._by_crawler:
            cls._by_crawler[crawler] = cls(crawler.settings, Config.of(crawler))
        return cls._by_crawler[crawler]

    def host(self, request: Request, downloader: Downloader) -> asyncio.Semaphore:
        """One semaphore per downloader slot, keyed as Scrapy keys it (meta download_slot,
        or the host, or its IP with CONCURRENT_REQUESTS_PER_IP) and sized as Scrapy sizes it
        (DOWNLOAD_SLOTS concurrency, else CONCURRENT_REQUESTS_PER_IP, else _PER_DOMAIN)."""
        key = downloader.get_slot_key(request)
        if key not in self._slots:
            size = self._slot_settings.get(key, {}).get("concurrency", self._per_slot)
            self._slots[key] = asyncio.Semaphore(max(1, int(size)))
        return self._slots[key]

    def buckets(self, request: Request, downloader: Downloader) -> tuple[TokenBucket, ...] | None:
        """The bandwidth caps a transfer is charged to (the crawl's, its slot's); None when
        there are none."""
        if self._host_rate:
            key = downloader.get_slot_key(request)
            host = self._rate_slots.get(key)
            if host is None:
                host = self._rate_slots[key] = self._bucket(f"slot-{key}", self._host_rate)
            return (host,) if self._rate_total is None else (self._rate_total, host)
        return None if self._rate_total is None else (self._rate_total,)

    def _bucket(self, name: str, rate: float) -> TokenBucket:
        """A cap's bucket: this process's own, or in a worker the one every worker of the run shares."""
        if self._shared is None:
            return TokenBucket(rate, now=monotonic())
        file = hashlib.blake2b(name.encode(), digest_size=8).hexdigest()
        return SharedTokenBucket(self._shared / f"{file}.rate", rate, now=monotonic())


def _fitting_concurrency(wanted: int) -> int:
    """Transfers that fit in the file-descriptor limit (``ulimit -n``): each
    needs a socket and a .part file, and Scrapy needs some for itself. The soft
    limit is raised to the hard one first; past that, fewer transfers run at once
    rather than failing on EMFILE."""
    wanted = max(1, wanted)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * wanted + _RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < needed:
        with contextlib.suppress(ValueError, OSError):
            soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    fitting = max(1, (soft - _RESERVED_FDS) // 2)
    logger.warning("CONCURRENT_REQUESTS=%d needs about %d file descriptors, but the limit (ulimit -n) is %d: "
                   "running %d transfers at once", wanted, needed, soft, fitting)
    return fitting
