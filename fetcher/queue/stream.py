"""A reliable work queue on Redis, shared by fetcher workers on many machines.

No Scrapy here. A queue is named by a URL, ``redis://[:password@]host:port/db
?queue=NAME`` (``rediss://`` for TLS); NAME defaults to ``fetcher``. All of a
queue's keys share the hash tag ``{NAME}`` (one Redis Cluster slot):

- ``fetcher:{NAME}:stream``: a Redis Stream holding every entry that is
  waiting or in flight, fields ``u`` (the URL) and ``t`` (the list entry, URL
  line plus indented options; left out when it is the bare URL). Its consumer
  group ``workers`` hands entries out; the group's pending entries list (PEL)
  says which worker (consumer) holds which entry, since when, and how many
  times the entry was delivered. An acknowledged entry is deleted, so the
  stream's length is "waiting + in flight".
- ``fetcher:{NAME}:seen``: a set of every URL ever enqueued, so a URL is
  enqueued once however many lists name it (use a new NAME to fetch again).
- ``fetcher:{NAME}:records``: a hash, URL -> its current record (a JSON
  object in the manifest format), whichever worker wrote it.
- ``fetcher:{NAME}:failed``: the URLs whose current record failed (so that
  status() counts without reading records).
- ``fetcher:{NAME}:dead``: the URLs dead-lettered (see below).
- ``fetcher:{NAME}:workers``: the names of the workers that heartbeat, and
  ``fetcher:{NAME}:alive:<consumer>``: the Redis server time of a worker's
  last heartbeat, expiring after three leases. A worker that holds nothing
  and has no live heartbeat is forgotten by the next take() (any worker's).

Guarantees, for workers that take, heartbeat every lease/3 seconds, write
the record, then ack:

- No URL is lost when a worker dies (``kill -9``, a lost machine): its
  entries stay pending under its name; once one has gone a lease without a
  heartbeat, the next take() of any worker reclaims it (XAUTOCLAIM).
- None is downloaded twice in normal operation: an entry is delivered to one
  worker (XREADGROUP), and its heartbeat (XCLAIM ... JUSTID of the entries it
  still holds) keeps it from being reclaimed however long the download takes.
  Twice happens only after a failure: a worker that died (or stalled a whole
  lease) after writing a record but before its ack, or a lost reply.
- A URL that kills its workers does not go round forever: an entry
  delivered more than ``max_deliveries`` times without an ack is
  dead-lettered (a failed record, the dead set, deleted from the stream).
- Nothing is half done: ack (XACK + XDEL), a record write, and a
  dead-lettering are each one MULTI transaction or Lua script.

Times (leases, heartbeat ages) are Redis server times, so the clocks of the
workers' machines need not agree. Every Redis failure surfaces as
QueueUnavailable, whose message never holds the password.

Every call is synchronous (a few round trips, a few milliseconds on a LAN)
and none waits for work: take() returns [] at once when nothing is free. A
call to an unreachable Redis gives up after socket_timeout (connecting:
at most 5 s) per try, three tries. In a Twisted reactor, run them in a
thread (the object is thread-safe) or accept these short blocks.

Needs Redis 7.0 or later. Redis holds about 170 MB per million waiting URLs
of 50 characters (stream 70, seen set 100 bytes a URL); the seen set stays
after the entries are done, and each record adds its JSON's size.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from fetcher.redact import safe_line

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

DEFAULT_QUEUE = "fetcher"
GROUP = "workers"
_QUEUE_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
_DEFAULT_PORT = 6379
_RELEASED_IDLE_MS = 365 * 24 * 3600 * 1000  # "idle for a year": any worker's lease has expired
_SCAN_CALLS = 100  # XAUTOCLAIM calls per take (each looks at up to 10 x n PEL entries)
_T = TypeVar("_T")


class QueueUnavailable(Exception):
    """Redis cannot be reached or refused us (message fit for the user, no password in it)."""


@dataclass(frozen=True)
class Delivery:
    """One entry handed to this worker: ack(id) once its record is written."""

    id: str
    url: str
    text: str  # the list entry (URL line + indented options), as given to enqueue
    deliveries: int  # 1 the first time; more when reclaimed from a worker that died


@dataclass
class QueueStatus:
    """What the queue looks like now, for progress displays and operators."""

    waiting: int  # not yet delivered
    in_flight: dict[str, int]  # worker (consumer) -> entries it holds, for every worker known
    heartbeats: dict[str, float | None]  # worker -> seconds since its last heartbeat (None: none in 3 leases)
    done: int  # URLs whose current record is not failed
    failed: int  # URLs whose current record failed (dead ones included)
    dead: int  # URLs dead-lettered


def _redis() -> Any:
    """redis-py, imported on first use: a run that uses no queue does not load it."""
    import redis  # noqa: PLC0415
    import redis.backoff  # noqa: PLC0415
    import redis.retry  # noqa: PLC0415

    return redis


def is_queue_url(value: str) -> bool:
    """Whether a setting names a Redis queue rather than a list file."""
    return value.lower().startswith(("redis://", "rediss://"))


def parse_queue_url(url: str) -> tuple[dict[str, Any], str]:
    """``redis://[[user]:password@]host[:port][/db][?queue=NAME]`` (or rediss://)
    -> (redis.Redis keyword arguments, queue name).

    Raises ValueError on a bad URL; the message never quotes the password.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:  # a bad port or IPv6 literal; urllib's text quotes no password
        raise ValueError(f"bad Redis queue URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss"):
        raise ValueError("a Redis queue URL starts with redis:// or rediss://")
    if not parts.hostname:
        raise ValueError("a Redis queue URL needs a host: redis://host:port/db")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the Redis database must be a number (redis://host:port/0), not {path!r}")
    if parts.fragment:
        raise ValueError("a Redis queue URL has no #fragment")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError("a Redis queue URL's query must read ?queue=NAME") from None
    unknown = sorted(set(query) - {"queue"})
    if unknown:
        raise ValueError(f"unknown Redis queue URL parameter {unknown[0]!r} (known: queue)")
    names = query.get("queue", [DEFAULT_QUEUE])
    if len(names) != 1 or not _QUEUE_NAME.fullmatch(names[0]):
        raise ValueError("the queue name (?queue=NAME) must be 1-200 letters, digits, '.', '_' or '-'")
    kwargs: dict[str, Any] = {
        "host": parts.hostname,
        "port": _DEFAULT_PORT if port is None else port,
        "db": int(path or 0),
    }
    if parts.username:
        kwargs["username"] = unquote(parts.username)
    if parts.password is not None:
        kwargs["password"] = unquote(parts.password)
    if scheme == "rediss":
        kwargs["ssl"] = True
    return kwargs, names[0]


def _utf8(text: str) -> bool:
    """Whether *text* came from valid UTF-8 (undecodable bytes arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    """*text* fit for a record and a log line: undecodable bytes shown as ``\\xff``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# KEYS: seen, stream. ARGV[1]: a JSON array [url, text, url, text, ...] (text
# "" = the bare URL; one argument, as packing thousands is slow in redis-py).
# A URL in the seen set (SMISMEMBER) or earlier in the batch is a duplicate;
# the new ones are XADDed and SADDed at once. One round trip per batch, and the
# script runs atomically: a URL is never enqueued twice, even by two enqueuers.
_ENQUEUE = """
local batch = cjson.decode(ARGV[1])
local urls = {}
for i = 1, #batch, 2 do urls[#urls + 1] = batch[i] end
local known, new = {}, {}
for i = 1, #urls, 1000 do  -- unpack has a stack limit
  local chunk = {unpack(urls, i, math.min(i + 999, #urls))}
  local flags = redis.call('SMISMEMBER', KEYS[1], unpack(chunk))
  for j = 1, #chunk do
    local url = chunk[j]
    if flags[j] == 0 and not known[url] then
      known[url] = true
      new[#new + 1] = url
      local text = batch[2 * (i + j - 1)]
      if text == '' then
        redis.call('XADD', KEYS[2], '*', 'u', url)
      else
        redis.call('XADD', KEYS[2], '*', 'u', url, 't', text)
      end
    end
  end
end
for i = 1, #new, 1000 do
  redis.call('SADD', KEYS[1], unpack(new, i, math.min(i + 999, #new)))
end
return #new
"""

# KEYS: stream. ARGV: group, consumer, min-idle ms, cursor, n, max calls.
# XAUTOCLAIM in a loop, in the server, until n entries or the PEL's end:
# -> {next cursor, {{id, {field, value, ...}, delivery count}, ...}}.
_RECLAIM = """
local got = {}
local cursor = ARGV[4]
local want = tonumber(ARGV[5])
local calls = 0
repeat
  local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], cursor,
                           'COUNT', want - #got)
  cursor = reply[1]
  for _, entry in ipairs(reply[2]) do
    if type(entry[2]) == 'table' then
      local pending = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
      local count = 1
      if pending[1] then count = pending[1][4] end
      table.insert(got, {entry[1], entry[2], count})
    end
  end
  calls = calls + 1
until cursor == '0-0' or #got >= want or calls >= tonumber(ARGV[6])
return {cursor, got}
"""

# KEYS: stream, alive key, workers. ARGV: group, consumer, ttl ms, id, id, ...
# Refreshes the lease of each id this consumer still holds (XCLAIM JUSTID sets
# its idle time to 0 and leaves its delivery count alone); returns the ids it
# no longer holds (taken over after a missed lease, or acked).
_HEARTBEAT = """
local now = redis.call('TIME')
redis.call('SET', KEYS[2], now[1] .. '.' .. string.format('%06d', now[2]), 'PX', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[2])
local mine, lost = {}, {}
for i = 4, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if pending[1] then table.insert(mine, ARGV[i]) else table.insert(lost, ARGV[i]) end
end
for i = 1, #mine, 1000 do  -- unpack has a stack limit
  local ids = {unpack(mine, i, math.min(i + 999, #mine))}
  table.insert(ids, 'JUSTID')
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(ids))
end
return lost
"""

# KEYS: stream. ARGV: group, consumer, idle ms, id, id, ...
# Hands back entries this consumer holds but will not finish (a clean stop):
# idle "for a year", so any worker's next take reclaims them, and with one
# delivery less, so that a stop does not count towards the dead-letter rule.
_RELEASE = """
local released = 0
for i = 4, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if pending[1] then
    local count = math.max(pending[1][4] - 1, 0)
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3],
               'RETRYCOUNT', count, 'JUSTID')
    released = released + 1
  end
end
return released
"""

# KEYS: stream, alive key, workers. ARGV: group, consumer.
# A consumer that holds nothing can go (deleting one that holds entries would
# lose them, hence the check in the same script).
_LEAVE = """
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[2])
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if pending[1] then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""

# KEYS: stream, workers. ARGV: group, alive key prefix, idle ms.
# Forgets workers that hold nothing and have no live heartbeat (they died or
# stopped), so that status() lists the live ones and those still holding work.
_PRUNE = """
local holding = {}
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, c in ipairs(consumers) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[3])
     and redis.call('EXISTS', ARGV[2] .. info['name']) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
  elseif info['pending'] > 0 then
    holding[info['name']] = true
  end
end
for _, name in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not holding[name] and redis.call('EXISTS', ARGV[2] .. name) == 0 then
    redis.call('SREM', KEYS[2], name)
  end
end
return 0
"""


class RedisQueue:
    """One worker's handle on a queue (thread-safe; one per process is enough).

    Every call is one or a few round trips to Redis and never waits for work:
    each returns within socket_timeout (plus up to two quick retries of a
    failed connection) or raises QueueUnavailable.
    """

    def __init__(
        self,
        url: str,
        *,
        consumer: str | None = None,
        lease: float = 60.0,
        max_deliveries: int = 5,
        socket_timeout: float = 10.0,
    ) -> None:
        kwargs, self.name = parse_queue_url(url)
        if lease <= 0:
            raise ValueError(f"lease must be positive, not {lease}")
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be at least 1, not {max_deliveries}")
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{random.getrandbits(32):08x}"
        self.lease = lease
        self.max_deliveries = max_deliveries
        self.socket_timeout = socket_timeout
        self._password: str | None = kwargs.get("password")
        self._where = f"{kwargs['host']}:{kwargs['port']}/{kwargs['db']} (queue {self.name!r})"
        self._redis = _redis().Redis(
            **kwargs,
            socket_timeout=socket_timeout,
            socket_connect_timeout=min(socket_timeout, 5.0),
            decode_responses=True,
            # Bytes that are not UTF-8 (an entry another client wrote) decode to lone surrogates
            # instead of raising in every worker that takes the entry; they are dead-lettered.
            encoding_errors="surrogateescape",
            protocol=2,
            # A blip is retried twice at once; longer outages are the caller's to handle.
            retry=_redis().retry.Retry(_redis().backoff.ExponentialBackoff(cap=0.5, base=0.1), 2),
        )
        prefix = f"fetcher:{{{self.name}}}:"
        self._stream = prefix + "stream"
        self._seen = prefix + "seen"
        self._records = prefix + "records"
        self._failed = prefix + "failed"
        self._dead = prefix + "dead"
        self._workers = prefix + "workers"
        self._alive_prefix = prefix + "alive:"
        self._alive = self._alive_prefix + self.consumer
        self._enqueue_script = self._redis.register_script(_ENQUEUE)
        self._reclaim_script = self._redis.register_script(_RECLAIM)
        self._heartbeat_script = self._redis.register_script(_HEARTBEAT)
        self._release_script = self._redis.register_script(_RELEASE)
        self._leave_script = self._redis.register_script(_LEAVE)
        self._prune_script = self._redis.register_script(_PRUNE)
        self._lock = threading.Lock()
        self._held: set[str] = set()  # ids taken and not acked: the heartbeat keeps only these
        self._ready = False
        self._cursor = "0-0"  # where the next reclaim pass goes on in the PEL
        self._reclaim_after = 0.0  # monotonic: no expired entry was left at the last full pass
        self._prune_after = 0.0
        self._unreachable = False  # the last call could not reach Redis: close() does not try again

    # -- errors ------------------------------------------------------------

    def _fail(self, exc: redis.RedisError) -> NoReturn:
        message = self._explain(exc)
        if self._password:
            message = message.replace(self._password, "***")
        raise QueueUnavailable(message) from exc

    def _explain(self, exc: redis.RedisError) -> str:
        """What a Redis error means for the person running the queue, in one line."""
        text, where = str(exc), self._where
        upper = text.upper()
        needs_password = (f"Redis at {where} requires a password: "
                          "give it in the queue URL, redis://:PASSWORD@host:port/db")
        refused = isinstance(exc, _redis().AuthenticationError) or "WRONGPASS" in upper or "INVALID PASSWORD" in upper
        if refused and ("REQUIRED" in upper or "NOAUTH" in upper):
            return needs_password
        if refused and "WITHOUT ANY PASSWORD" in upper:
            return f"Redis at {where} has no password set, but the queue URL gives one"
        if refused:
            return f"Redis at {where} refused the password (or user) of the queue URL"
        if "NOAUTH" in upper:
            return needs_password
        if "NOPERM" in upper:
            return f"the Redis user of the queue URL may not use the queue at {where}: {text}"
        if isinstance(exc, _redis().TimeoutError):
            return f"Redis at {where} did not answer within {self.socket_timeout:g} s: {text}"
        if isinstance(exc, _redis().ConnectionError):
            return f"cannot reach Redis at {where}: {text}"
        if "UNKNOWN COMMAND" in upper or "UNKNOWN SUBCOMMAND" in upper:
            return f"Redis at {where} is too old for the queue (7.0 or later needed): {text}"
        return f"Redis at {where} refused a queue command: {text}"

    def _call(self, fn: Callable[[], _T]) -> _T:
        try:
            result = fn()
        except _redis().RedisError as exc:
            self._unreachable = isinstance(exc, _redis().ConnectionError | _redis().TimeoutError)
            self._fail(exc)
        self._unreachable = False
        return result

    def _ensure(self) -> None:
        if not self._ready:
            self.check()

    # -- setup -------------------------------------------------------------

    def check(self) -> None:
        """PING, and create the stream and its group if missing (MKSTREAM), so
        that a bad URL or password shows before any work starts."""

        def run() -> None:
            self._redis.ping()
            try:
                # From id 0: entries enqueued before the group existed are delivered too.
                self._redis.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
            except _redis().ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        self._call(run)
        self._ready = True

    # -- producers ---------------------------------------------------------

    def enqueue(self, entries: Iterable[tuple[str, str]], batch: int = 1000) -> tuple[int, int]:
        """Add (url, text) pairs, reading them lazily (flat memory for any
        number); a URL ever enqueued to this queue before is skipped.
        Returns (added, duplicates). Each batch is one script run: atomic, so
        a failure leaves the batches before it enqueued and none half done,
        and enqueueing again skips what is in."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        self._ensure()
        keys = [self._seen, self._stream]
        added = total = 0
        flat: list[str] = []

        def send() -> int:
            payload = json.dumps(flat, ensure_ascii=False, separators=(",", ":"))
            return int(self._call(lambda: self._enqueue_script(keys=keys, args=[payload])))

        for url, text in entries:
            if not url:
                raise ValueError("cannot enqueue an empty URL")
            flat.append(url)
            flat.append("" if text == url else text)
            if len(flat) >= 2 * batch:
                added += send()
                total += len(flat) // 2
                flat = []
        if flat:
            added += send()
            total += len(flat) // 2
        return added, total - added

    # -- workers -----------------------------------------------------------

    def record(self, url: str, record: dict[str, Any]) -> None:
        """Store the URL's current record (replacing any earlier one), before
        ack: a worker that dies in between leaves the entry to be redone."""
        value = json.dumps(record, ensure_ascii=False)
        failed = record.get("status") == "failed"

        def run() -> None:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._records, url, value)
                if failed:
                    pipe.sadd(self._failed, url)
                else:
                    pipe.srem(self._failed, url)
                pipe.execute()

        self._call(run)

    def take(self, n: int) -> list[Delivery]:
        """Up to n entries for this worker, at once (never waits for work):
        first those whose lease expired (their worker died), then new ones.
        An entry delivered more than max_deliveries times is dead-lettered
        instead of returned. [] means none free now, not drained()."""
        if n < 1:
            return []
        self._ensure()
        taken: list[Delivery] = []
        now = time.monotonic()
        if now >= self._reclaim_after:
            taken += self._reclaim(n)
        if len(taken) < n:
            taken += self._take_new(n - len(taken))
        if now >= self._prune_after:
            self._prune_after = now + self.lease
            self._call(lambda: self._prune_script(
                keys=[self._stream, self._workers], args=[GROUP, self._alive_prefix, int(3 * self.lease * 1000)]))
        return taken

    def _reclaim(self, n: int) -> list[Delivery]:
        with self._lock:
            cursor = self._cursor
        cursor, claimed = self._call(lambda: self._reclaim_script(
            keys=[self._stream], args=[GROUP, self.consumer, int(self.lease * 1000), cursor, n, _SCAN_CALLS]))
        with self._lock:
            self._cursor = cursor
            if cursor == "0-0" and len(claimed) < n:  # the whole PEL was seen: rest a little
                self._reclaim_after = time.monotonic() + min(1.0, self.lease / 10)
        taken = []
        for entry_id, flat, count in claimed:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            with self._lock:
                if entry_id in self._held:  # ours, still in hand: a late heartbeat, not a new delivery
                    continue
            if int(count) > self.max_deliveries:
                self._dead_letter(entry_id, fields, int(count) - 1)
                continue
            delivery = self._delivery(entry_id, fields, int(count))
            if delivery is not None:
                taken.append(delivery)
        return taken

    def _take_new(self, n: int) -> list[Delivery]:
        reply: Any = self._call(lambda: self._redis.xreadgroup(GROUP, self.consumer, {self._stream: ">"}, count=n))
        taken = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                delivery = self._delivery(entry_id, fields or {}, 1)
                if delivery is not None:
                    taken.append(delivery)
        return taken

    def _delivery(self, entry_id: str, fields: dict[str, str], count: int) -> Delivery | None:
        url = fields.get("u")
        if not url:  # not written by enqueue: drop it rather than hand it round forever
            logger.warning("queue %s: dropping stream entry %s without a URL", self.name, entry_id)
            self._call(lambda: self._ack(entry_id))
            return None
        if not (_utf8(url) and _utf8(fields.get("t") or "")):
            self._dead_letter(entry_id, fields, count, why="the entry is not valid UTF-8")
            return None
        with self._lock:
            self._held.add(entry_id)
        return Delivery(id=entry_id, url=url, text=fields.get("t") or url, deliveries=count)

    def _dead_letter(self, entry_id: str, fields: dict[str, str], times: int, why: str | None = None) -> None:
        """Take the entry out of the queue for good, with a failed record (and in the dead set)."""
        url = fields.get("u")
        if not url:
            self._call(lambda: self._ack(entry_id))
            return
        why = why or f"delivered {times} times without an acknowledgement (a worker died on it each time)"
        shown = safe_line(_printable(url))
        record = {
            "url": shown, "status": "failed", "path": None, "size": None, "checksum": None,
            "algorithm": None, "http_status": None, "attempts": times, "error": f"dead-lettered: {why}",
            "note": None, "mirror": None, "run": None, "finished_at": _utc_now(),
            "entry": safe_line(_printable(fields.get("t") or url)),
        }
        logger.warning("queue %s: dead-lettered %s: %s", self.name, shown, why)

        def run() -> None:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._records, url, json.dumps(record, ensure_ascii=False))
                pipe.sadd(self._failed, url)
                pipe.sadd(self._dead, url)
                pipe.xack(self._stream, GROUP, entry_id)
                pipe.xdel(self._stream, entry_id)
                pipe.execute()

        self._call(run)

    def _ack(self, entry_id: str) -> None:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self._stream, GROUP, entry_id)
            pipe.xdel(self._stream, entry_id)
            pipe.execute()

    def ack(self, delivery_id: str) -> None:
        """Done with an entry (XACK + XDEL, one transaction): call only after
        its record was written, or a death in between loses the record."""
        with self._lock:  # first, so that a heartbeat meanwhile does not call it lost
            held = delivery_id in self._held
            self._held.discard(delivery_id)
        try:
            self._call(lambda: self._ack(delivery_id))
        except QueueUnavailable:
            if held:
                with self._lock:
                    self._held.add(delivery_id)
            raise

    def heartbeat(self) -> None:
        """Keep the lease of every entry this worker holds (a long download is
        never taken over) and show it alive. Call every lease/3 seconds."""
        with self._lock:
            held = list(self._held)
        lost = self._call(lambda: self._heartbeat_script(
            keys=[self._stream, self._alive, self._workers],
            args=[GROUP, self.consumer, max(int(3 * self.lease * 1000), 1), *held]))
        with self._lock:
            lost = [entry_id for entry_id in lost if entry_id in self._held]  # not acked meanwhile
            self._held.difference_update(lost)
        if lost:
            logger.warning("queue %s: %d entries were taken over by other workers after a missed lease "
                           "(they may be downloaded twice)", self.name, len(lost))

    # -- everyone ----------------------------------------------------------

    def drained(self) -> bool:
        """Whether all work is over: nothing waiting and nothing in flight
        anywhere (an entry held by a dead worker still counts: it comes back)."""
        self._ensure()

        def run() -> bool:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.xlen(self._stream)
                pipe.xpending(self._stream, GROUP)
                length, pending = pipe.execute()
            return int(length) == 0 and int(pending["pending"]) == 0

        return self._call(run)

    def status(self) -> QueueStatus:
        """Counts for a progress display (one consistent snapshot)."""
        self._ensure()

        def run() -> QueueStatus:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.xlen(self._stream)
                pipe.xpending(self._stream, GROUP)
                pipe.xinfo_consumers(self._stream, GROUP)
                pipe.hlen(self._records)
                pipe.scard(self._failed)
                pipe.scard(self._dead)
                pipe.smembers(self._workers)
                pipe.time()
                length, pending, consumers, records, failed, dead, workers, now = pipe.execute()
            in_flight = {c["name"]: int(c["pending"]) for c in consumers}
            for name in sorted(workers):
                in_flight.setdefault(name, 0)
            names = list(in_flight)
            beats = self._redis.mget([self._alive_prefix + name for name in names]) if names else []
            server_now = now[0] + now[1] / 1e6
            return QueueStatus(
                waiting=max(int(length) - int(pending["pending"]), 0),
                in_flight=in_flight,
                heartbeats={name: None if beat is None else max(server_now - float(beat), 0.0)
                            for name, beat in zip(names, beats, strict=True)},
                done=int(records) - int(failed),
                failed=int(failed),
                dead=int(dead),
            )

        return self._call(run)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every URL's current record, whichever worker wrote it (HSCAN, so
        memory stays flat; records written meanwhile may or may not show)."""
        scan = self._redis.hscan_iter(self._records, count=1000)
        while True:
            try:
                item = next(scan)
            except StopIteration:
                return
            except _redis().RedisError as exc:
                self._fail(exc)
            yield json.loads(item[1])

    def close(self) -> None:
        """Leave, best effort (never raises): entries still held (taken, not
        acked) go back to the queue at once for any other worker, with one
        delivery less (a clean stop is not a death); then the connections
        are closed. When Redis was unreachable at the last call, or is now,
        the held entries come back after the lease instead."""
        with self._lock:
            held = list(self._held)
            self._held.clear()
        try:
            if self._ready and not self._unreachable:
                if held:
                    self._call(lambda: self._release_script(
                        keys=[self._stream], args=[GROUP, self.consumer, _RELEASED_IDLE_MS, *held]))
                self._call(lambda: self._leave_script(
                    keys=[self._stream, self._alive, self._workers], args=[GROUP, self.consumer]))
        except QueueUnavailable as exc:
            logger.warning("queue %s: could not hand back %d unfinished entries (they come back after the "
                           "%g s lease): %s", self.name, len(held), self.lease, exc)
        finally:
            self._redis.close()
