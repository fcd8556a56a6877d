"""Reading one response body for the streaming download handler.

:class:`BodyReader` is the Twisted protocol a response body is delivered to: it
feeds each chunk to the sink (or keeps a bounded start of an error page), sends
``bytes_received``, watches for stalls, the size cap and FETCHER_MAX_TIME, and
pauses its transport while a bandwidth cap or a sink that fell behind asks it to
(the bytes wait in the kernel, then TCP slows the sender; memory stays flat).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from fetcher.exceptions import ConnectionLost, StallTimeoutError
from fetcher.redact import safe_url
from fetcher.store.writer import FileTooLarge

if TYPE_CHECKING:
    from collections.abc import Callable

    from scrapy import Request
    from scrapy.exceptions import StopDownload
    from scrapy.statscollectors import StatsCollector
    from twisted.internet.base import DelayedCall
    from twisted.python.failure import Failure

    from fetcher.contract import Pending, Sink
    from fetcher.transfer.ratelimit import TokenBucket

logger = logging.getLogger(__name__)

#: How much of a body that is not streamed (an error page) is kept.
ERROR_BODY_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class BodyRules:
    """What bounds one body while it flows."""

    stall_timeout: float  # seconds of silence (0: none)
    maxsize: int  # body bytes (0: no cap)
    warnsize: int  # body bytes past which one warning is logged (0: none)
    fail_on_dataloss: bool


@dataclass(frozen=True, slots=True)
class Ended:
    """How a body ended without an error."""

    body: bytes = b""  # the kept start of an error page; empty when streamed
    unverified: bool = False  # with the connection, and no length to check it against
    dataloss: bool = False  # cut short, kept as DOWNLOAD_FAIL_ON_DATALOSS=False asks
    stopped: StopDownload | None = None  # by a bytes_received handler


class Discard(Protocol):
    """Closes a response body nobody wants, so its connection is not left open."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()


class BodyReader(Protocol):
    """Feeds body chunks to the sink (or keeps a bounded error body), sends
    bytes_received, watches for stalls and the size cap, and pauses its transport
    while a bandwidth cap or the sink asks: one pause for both, lifted when neither
    does, and never counted as a stall (the stall timer does not run meanwhile).

    Fires *finished* with how the body ended, or errs with why it was cut."""

    def __init__(
        self,
        finished: Deferred[Ended],
        sink: Sink | None,
        request: Request,
        rules: BodyRules,
        *,
        warned: bool,
        reactor: Any,
        stats: StatsCollector,
        send: Callable[[bytes], StopDownload | None],
        buckets: tuple[TokenBucket, ...] | None = None,
    ) -> None:
        self.finished = finished
        self._sink = sink
        self._request = request
        self._rules = rules
        self._warned = warned
        self._stats = stats  # fetcher/bytes_received moves as bytes arrive: the progress display reads it
        self._send = send  # bytes_received
        self._buffer = bytearray()
        self._received = 0
        self._reactor = reactor
        self._stall_call: DelayedCall | None = None  # None while paused (or with no stall timeout)
        self._arm_stall()
        self._buckets = buckets  # the bandwidth caps; None: none, and nothing to do per chunk
        self._resume_call: DelayedCall | None = None  # while paused for a cap
        self._backlog: Pending | None = None  # while paused for the sink

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._received += len(data)
        if self._stall_call is not None:
            self._stall_call.reset(self._rules.stall_timeout)
        if self._sink is None:  # an error page: keep its start
            self._buffer += data[: ERROR_BODY_LIMIT - len(self._buffer)]
        else:
            maxsize = self._rules.maxsize
            if maxsize and self._received > maxsize:
                self.fail(FileTooLarge(f"file is over download_maxsize ({maxsize} body bytes)"))
                return
            try:
                self._sink.write(data)
            except Exception as exc:  # disk full, size cap: stop the transfer, report why
                self.fail(exc)
                return
            self._stats.inc_value("fetcher/bytes_received", len(data))
            warnsize = self._rules.warnsize
            if warnsize and not self._warned and self._received > warnsize:
                self._warned = True
                warn_size(self._request, self._received, warnsize, expected=False)
        stopped = self._send(data)
        if stopped is not None:
            self._end(stopped=stopped)
            self.stop()
        elif len(self._buffer) >= ERROR_BODY_LIMIT:  # the rest of an error page is not worth reading
            self._end()
            self.stop()
        else:
            if self._buckets is not None:
                self._pace(len(data))
            if self._sink is not None:
                self._await_sink()

    def _pace(self, n: int) -> None:
        """Charge *n* received bytes to every cap; over one, stop reading the socket
        until its debt is paid (the bytes wait in the kernel, then TCP slows the sender)."""
        now = monotonic()
        wait = 0.0
        for bucket in cast("tuple[TokenBucket, ...]", self._buckets):
            wait = max(wait, bucket.take(n, now))
        if not wait:
            return
        self._hold()
        call = self._resume_call
        if call is None:
            self._resume_call = self._reactor.callLater(wait, self._paid)
        elif call.getTime() - self._reactor.seconds() < wait:  # more chunks of the same read
            call.reset(wait)

    def _paid(self) -> None:
        self._resume_call = None
        self._release()

    def _await_sink(self) -> bool:
        """Whether the sink fell behind (a disk worker): then read no more until it caught up.
        Its bytes in flight are bounded by the pause (about one batch more), not by the sender."""
        ready = getattr(self._sink, "ready", None)  # optional: fetcher.contract.Paced
        if ready is None:
            return False
        try:
            pending = ready()
        except Exception as exc:  # a write that failed on the worker: stop now, report why
            self.fail(exc)
            return False
        if pending is None:
            return False
        self._hold()
        if pending is not self._backlog:
            self._backlog = pending
            when_done(pending, self._reactor).addCallback(lambda _: self._caught_up(pending))
        return True

    def _caught_up(self, pending: Pending) -> None:
        if self.finished.called or pending is not self._backlog:
            return  # the transfer ended meanwhile: nothing of it is touched
        self._backlog = None
        if not self._await_sink():
            self._release()

    def _hold(self) -> None:
        """Pause the transport for a cap or the sink; the stall timer waits too (our own pause
        is no stall)."""
        assert self.transport is not None
        # Every time, not only when the pause begins: Twisted resumes the transport itself
        # after replaying the chunks that arrived before the body had a reader.
        self.transport.pauseProducing()
        if self._stall_call is not None:
            if self._stall_call.active():
                self._stall_call.cancel()
            self._stall_call = None

    def _release(self) -> None:
        """Resume the transport once neither a cap nor the sink holds it; silence counts from now."""
        if self.finished.called or self._resume_call is not None or self._backlog is not None:
            return
        self._arm_stall()
        assert self.transport is not None
        self.transport.resumeProducing()

    def _arm_stall(self) -> None:
        """Silence counts from now."""
        if not self._rules.stall_timeout:
            return
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.reset(self._rules.stall_timeout)
        else:
            self._stall_call = self._reactor.callLater(self._rules.stall_timeout, self._stalled)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone):
            self._end()
        elif reason.check(PotentialDataLoss):  # no length: a reset looks the same as the end
            self._end(unverified=True)
        elif not self._rules.fail_on_dataloss:
            self._end(dataloss=True)
        else:
            self.fail(ConnectionLost(
                f"connection lost after {self._received} body bytes: {describe(reason.value)}"))

    def fail(self, exc: Exception) -> None:
        """End the transfer now with *exc* (stall, size cap, disk error)."""
        if self._cancel_timers():
            self.finished.errback(exc)
            self.stop()

    def _end(self, *, unverified: bool = False, dataloss: bool = False, stopped: StopDownload | None = None) -> None:
        if self._cancel_timers():
            self.finished.callback(Ended(bytes(self._buffer), unverified, dataloss, stopped))

    def _cancel_timers(self) -> bool:
        """Stop watching for stalls and drop a pending resume (for a cap or the sink); False
        when the transfer had ended already."""
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.cancel()
        self._backlog = None
        if self._resume_call is not None:
            if self._resume_call.active():
                self._resume_call.cancel()
            self._resume_call = None
        return not self.finished.called

    def stop(self) -> None:
        """Stop receiving: the transfer is over (ended, failed or cancelled)."""
        self._cancel_timers()
        if self.transport is not None:
            self.transport.stopProducing()

    def _stalled(self) -> None:
        self.fail(StallTimeoutError(
            f"no data for {self._rules.stall_timeout:g} s after {self._received} body bytes "
            "(FETCHER_STALL_TIMEOUT)"
        ))


def when_done(pending: Pending, reactor: Any) -> Deferred[None]:
    """Fires on the reactor's thread once *pending* is done (a worker's thread runs its
    callbacks): what the body's reader and handler wait for a sink with."""
    done: Deferred[None] = Deferred()
    pending.add_done_callback(lambda _: reactor.callFromThread(done.callback, None))
    return done


def warn_size(request: Request, size: int, warnsize: int, *, expected: bool) -> None:
    logger.warning("%s %d bytes of %s, over download_warnsize (%d)",
                   "Expecting" if expected else "Received", size, safe_url(request.url), warnsize)


def describe(exc: BaseException) -> str:
    """Twisted wraps the real causes (TLS errors, resets) in ``reasons``."""
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return "; ".join(describe(r.value) for r in reasons)
    return str(exc) or type(exc).__name__
