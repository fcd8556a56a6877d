"""What the pipeline, the download handler and the spider agree on: the request
meta keys, the response flags, and the ``Sink`` a streamed body is written to.

One module, importing nothing from fetcher (and no Scrapy), so that each side
depends on the agreement rather than on the other side's module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

#: Request meta: the Sink a streamed body goes to (no sink: the stock handler answers).
SINK_META = "fetcher_sink"
#: Request meta: the list entry (fetcher.listing.urllist.Entry) a file request was made for.
ENTRY_META = "fetcher_entry"

#: Flag on responses whose body went to the sink.
STREAMED_FLAG = "fetcher:streamed"
#: Flag on streamed responses that ended with the connection, with no length to check.
UNVERIFIED_END_FLAG = "fetcher:unverified-end"
#: Stock's flags: a StopDownload from a signal handler ended the body; a body cut short was kept.
STOPPED_FLAG = "download_stopped"
DATALOSS_FLAG = "dataloss"
#: HttpCacheMiddleware's flag on a response it answered: the body is in memory.
CACHED_FLAG = "cached"


class HeadersLike(Protocol):
    """What a sink needs of response headers (scrapy.http.Headers fits)."""

    def get(self, key: str) -> bytes | None: ...


class Sink(Protocol):
    """Where a download handler streams a body: all the handler may use of it."""

    @property
    def expected_size(self) -> int | None:
        """The whole file's announced length once ``begin`` accepted a body; None if unknown."""

    def begin(self, status: int, headers: HeadersLike) -> bool:
        """Whether this response's body goes into the sink; raise to refuse the response."""

    def write(self, data: bytes) -> None:
        """Take the next body chunk; raise to stop the transfer (full disk, size cap)."""

    def finish(self, *, accept_short: bool = False) -> None:
        """The body ended; *accept_short* keeps a body cut short (DOWNLOAD_FAIL_ON_DATALOSS=False)."""


class Pending(Protocol):
    """Work a sink is behind on (a ``concurrent.futures.Future`` fits); its callbacks may run
    on any thread."""

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None: ...


class Paced(Sink, Protocol):
    """A sink that can fall behind (a disk worker). ``ready`` and ``settle`` are optional for a
    Sink: the handler asks ``ready`` after each ``write`` and pauses reading while it returns a
    Pending, so TCP slows the sender instead of the bytes piling up in memory."""

    def ready(self) -> Pending | None:
        """What must finish before more bytes are welcome; None: read on. Raise to stop the
        transfer (a write that failed on the worker)."""

    def settle(self) -> Pending | None:
        """Once the body ended, before ``finish``: what must finish first (the handler waits
        for it without holding the reactor, then asks again), or None. Raise as ``finish``."""
