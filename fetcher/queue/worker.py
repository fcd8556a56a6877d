"""The fetch spider's side of a shared queue (fetcher.queue.stream).

A worker takes entries as it has room, keeps their leases alive while they
download, and acknowledges each only after its record is in the store and in
Redis. A worker that dies leaves its entries to the others after
FETCHER_QUEUE_LEASE; a lost Redis stops the taking of work, and the run exits
non-zero.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fetcher.listing.urllist import BadLine, Entry, parse_text
from fetcher.queue.stream import QueueUnavailable, RedisQueue

if TYPE_CHECKING:
    from fetcher.config import Config
    from fetcher.queue.stream import Delivery

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_QUEUE_POLL = 0.5  # seconds between looks at an empty queue
_TAKE_AT_MOST = 256  # entries taken from Redis in one call

#: The store's current record of a URL (its manifest line), or None when it has none.
RecordLookup = Callable[[str], "dict[str, Any] | None"]


class QueueWorker:
    """Takes entries from a shared queue and acknowledges them once recorded."""

    def __init__(self, url: str, config: Config, lookup: RecordLookup) -> None:
        self.lease = config.queue_lease
        self.idle = config.queue_idle
        self.queue = RedisQueue(url, lease=self.lease, max_deliveries=config.queue_max_deliveries)
        self.lookup = lookup
        self.max_line, self.max_options = config.max_line, config.max_options
        self.lost = False
        self._taken: dict[str, list[str]] = {}  # URL -> ids of the deliveries it answers
        self._acks: set[asyncio.Task[None]] = set()

    async def entries(self, room: Callable[[], int]) -> AsyncIterator[Entry | BadLine]:
        """Entries as there is *room* for them, until the queue is drained and idle for
        FETCHER_QUEUE_IDLE (0: never), or Redis is lost."""
        heart = asyncio.get_running_loop().create_task(self._heartbeat())
        try:
            idle_since: float | None = None
            while not self.lost:
                free = room()
                deliveries = await self._call(self.queue.take, max(1, min(free, _TAKE_AT_MOST))) if free > 0 else []
                if deliveries is None:
                    return
                if deliveries:
                    idle_since = None
                    for delivery in deliveries:
                        yield self._parse(delivery)
                    continue
                if free > 0 and not self._taken:  # nothing here: is there anything left anywhere?
                    drained = await self._call(self.queue.drained)
                    if drained is None:
                        return
                    now = asyncio.get_running_loop().time()
                    idle_since = idle_since if drained and idle_since is not None else (now if drained else None)
                    if self.idle and idle_since is not None and now - idle_since >= self.idle:
                        return
                await asyncio.sleep(_QUEUE_POLL)
        finally:
            heart.cancel()

    def _parse(self, delivery: Delivery) -> Entry | BadLine:
        """One queue entry: a URL line and its options, read exactly as ``scrapy enqueue`` read them."""
        parsed = list(parse_text(delivery.text, max_line=self.max_line, max_options=self.max_options))
        first = parsed[0] if parsed else BadLine(0, delivery.text, "empty queue entry", delivery.url)
        url = first.url if isinstance(first, Entry) else (first.url or first.text)
        self._taken.setdefault(url, []).append(delivery.id)
        return first

    def finished(self, url: str) -> None:
        """The URL's record is in the store: copy it to Redis, then acknowledge."""
        ids = self._taken.pop(url, [])
        if not ids:
            return
        record = self.lookup(url) or {"url": url, "status": "failed", "error": "no record was written"}
        task = asyncio.get_running_loop().create_task(self._ack(url, record, ids))
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    async def _ack(self, url: str, record: dict[str, Any], ids: list[str]) -> None:
        def ack() -> None:
            self.queue.record(url, record)
            for delivery_id in ids:
                self.queue.ack(delivery_id)

        await self._call(ack)

    async def _heartbeat(self) -> None:
        while not self.lost:
            await asyncio.sleep(max(self.lease / 3, 0.2))
            await self._call(self.queue.heartbeat)

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T | None:
        """A Redis call off the event loop; a lost Redis is said once and stops the taking of work."""
        try:
            return await asyncio.to_thread(fn, *args)
        except QueueUnavailable as exc:
            if not self.lost:
                self.lost = True
                logger.error("Lost the queue: %s; no more work is taken, and what is in flight is not "
                             "acknowledged (other workers take it over after FETCHER_QUEUE_LEASE)", exc)
            return None

    async def close(self) -> None:
        if self._acks:
            await asyncio.gather(*self._acks, return_exceptions=True)
        self.queue.close()
