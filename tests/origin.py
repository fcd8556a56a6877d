"""Deterministic HTTP/1.1 test origin for fetcher's integration tests, benchmark and quick start.

The server is hand-rolled on ``asyncio.start_server`` instead of ``http.server`` because the
tests need exact control over the wire: when body bytes go out, when they stall, when the
socket is reset, which framing is used.  Bodies are generated, never stored: byte ``i`` of a
file is ``block[i % BLOCK_SIZE]`` where the block is derived from ``"<name>:<version>"``, so a
test can compute the expected content or digest of a multi-GiB file without the server ever
holding it in memory.

Use it from Python::

    with Origin().start() as origin:
        url = origin.url + "/gen/10m/a.bin?drop_at=4096"

or from a shell::

    python -m tests.origin --detach          # prints "serving on http://127.0.0.1:8765"

Only the standard library is used, plus ``cryptography`` for the self-signed TLS certificate.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import email.utils
import functools
import gzip
import hashlib
import http.client
import ipaddress
import logging
import math
import os
import shutil
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import weakref
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable, Iterable, Iterator

__all__ = [
    "BLOCK_SIZE",
    "SERVER_NAME",
    "Origin",
    "OriginStats",
    "content_bytes",
    "expected_digest",
    "Gen",
    "parse_size",
    "main",
]

log = logging.getLogger("tests.origin")

#: Period of the generated content.  Prime, so the pattern never lines up with the
#: power-of-two chunk sizes and offsets a buggy resume or writer would produce.
BLOCK_SIZE = 1_048_573
#: Sent as the ``Server`` header; the CLI uses it to recognise an origin it started earlier.
SERVER_NAME = "fetcher-test-origin"
DEFAULT_CLI_PORT = 8765

_LAST_MODIFIED_BASE = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
_SMALL_BODY = 64 * 1024  # bodies up to this size are hashed directly instead of via the cached block
_HIGH_WATER = 4 * 1024 * 1024  # transport write buffer before we wait for the client
_MAX_HEAD = 64 * 1024  # request line + headers
_RESET_FLUSH_TIMEOUT = 5.0  # how long a drop waits for the kernel to deliver the bytes before B
_HOLD_MAX = 120.0  # a held body goes on by itself after this long, so a forgotten gate cannot hang a test
_FILLER_LINE = 4096  # bytes of one header_bytes= filler line (CRLF included)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


# --------------------------------------------------------------------------- content


def parse_size(text: str) -> int:
    """Parse ``"123"``, ``"10k"``, ``"4m"``, ``"2g"`` (binary units, case-insensitive) into bytes."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in ("k", "m", "g") else ""
    digits = value[: len(value) - len(unit)]
    if not digits.isdigit() or not digits.isascii():
        raise ValueError(f"invalid size: {text!r}")
    return int(digits) * _SIZE_UNITS[unit]


def _seed(name: str, version: int) -> bytes:
    return f"{name}:{version}".encode()


@functools.lru_cache(maxsize=8)
def _doubled_block(name: str, version: int) -> bytes:
    """The content block twice over, so any window of up to BLOCK_SIZE bytes is one slice."""
    block = hashlib.shake_256(_seed(name, version)).digest(BLOCK_SIZE)
    return block + block


def _prefix(name: str, version: int, length: int) -> bytes:
    """First ``length`` (<= BLOCK_SIZE) bytes of the block; SHAKE output is prefix-stable,
    so this equals the cached block's start without paying for a whole MiB per small file."""
    return hashlib.shake_256(_seed(name, version)).digest(length)


def _iter_slices(name: str, version: int, start: int, end: int) -> Iterator[memoryview]:
    """Yield the body bytes ``[start, end)`` as zero-copy slices of at most BLOCK_SIZE bytes."""
    if start >= end:
        return
    if end <= _SMALL_BODY:
        yield memoryview(_prefix(name, version, end))[start:end]
        return
    view = memoryview(_doubled_block(name, version))
    pos = start
    while pos < end:
        n = min(end - pos, BLOCK_SIZE)
        offset = pos % BLOCK_SIZE
        yield view[offset : offset + n]
        pos += n


def content_bytes(name: str, size: int, version: int = 0, start: int = 0, end: int | None = None) -> bytes:
    """The deterministic body of ``name`` (or the slice ``[start, end)`` of it, clamped to size)."""
    stop = size if end is None else max(0, min(end, size))
    return b"".join(_iter_slices(name, version, max(0, start), stop))


@functools.lru_cache(maxsize=256)
def _digest(name: str, size: int, version: int, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    for piece in _iter_slices(name, version, 0, size):
        hasher.update(piece)
    return hasher.hexdigest()


def expected_digest(name: str, size: int, version: int = 0, algorithm: str = "sha256") -> str:
    """Hex digest of the whole body, streamed block by block (works for multi-GiB sizes; cached)."""
    return _digest(name, size, version, algorithm)


@functools.lru_cache(maxsize=4)
def _gzip_body(name: str, size: int, version: int) -> bytes:
    """gzip=1 materialises the body: only meant for small files."""
    return gzip.compress(content_bytes(name, size, version), compresslevel=6, mtime=0)


def _etag(name: str, size: int, version: int) -> str:
    return '"' + hashlib.sha1(f"{name}:{size}:{version}".encode()).hexdigest()[:16] + '"'


def _last_modified(version: int) -> dt.datetime:
    return _LAST_MODIFIED_BASE + dt.timedelta(days=version)


def _http_date(when: dt.datetime) -> str:
    return email.utils.format_datetime(when, usegmt=True)


def _parse_http_date(text: str) -> dt.datetime | None:
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


# --------------------------------------------------------------------------- stats


@dataclass
class OriginStats:
    """Counters updated by the server thread under a lock; use :meth:`snapshot` to read
    the containers consistently from another thread (plain int fields are safe to read)."""

    hits: int = 0
    hits_by_path: collections.Counter[str] = field(default_factory=collections.Counter)
    bytes_sent: int = 0
    bytes_by_path: collections.Counter[str] = field(default_factory=collections.Counter)
    inflight: int = 0
    inflight_max: int = 0
    connections: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def snapshot(self) -> OriginStats:
        """A consistent copy, safe to iterate while the server keeps running."""
        with self._lock:
            return OriginStats(
                hits=self.hits,
                hits_by_path=collections.Counter(self.hits_by_path),
                bytes_sent=self.bytes_sent,
                bytes_by_path=collections.Counter(self.bytes_by_path),
                inflight=self.inflight,
                inflight_max=self.inflight_max,
                connections=self.connections,
                requests=[dict(r) for r in self.requests],
            )

    def _reset(self) -> None:
        # inflight is live state, not history: keep it so in-progress requests still balance.
        with self._lock:
            self.hits = 0
            self.hits_by_path.clear()
            self.bytes_sent = 0
            self.bytes_by_path.clear()
            self.inflight_max = self.inflight
            self.connections = 0
            self.requests.clear()

    def _connected(self) -> None:
        with self._lock:
            self.connections += 1

    def _begin(self, path: str) -> None:
        with self._lock:
            self.hits += 1
            self.hits_by_path[path] += 1
            self.inflight += 1
            self.inflight_max = max(self.inflight_max, self.inflight)

    def _sent(self, path: str, n: int) -> None:
        with self._lock:
            self.bytes_sent += n
            self.bytes_by_path[path] += n

    def _end(self, record: dict[str, Any] | None) -> None:
        with self._lock:
            self.inflight -= 1
            if record is not None:
                self.requests.append(record)


# --------------------------------------------------------------------------- HTTP plumbing


class _HttpError(Exception):
    """A request we cannot parse: answered with ``status`` and the connection is closed."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message or HTTPStatus(status).phrase)
        self.status = status


class _BadParam(Exception):
    """A malformed query parameter: answered with 400 so a typo in a test is obvious."""


@dataclass
class _Request:
    method: str
    path: str  # raw (percent-encoded) path, no query
    query: str  # raw query string without "?"
    version: str
    headers: dict[str, str]
    params: dict[str, str]
    keep_alive: bool

    @property
    def key(self) -> str:
        """Identity for the fail/stall/drop counters: exact path + query."""
        return f"{self.path}?{self.query}" if self.query else self.path


class _Body:
    """A response payload addressed by offset, so ranges and misbehaviours can cut it anywhere."""

    length: int

    def piece(self, pos: int, n: int) -> memoryview:
        raise NotImplementedError


class _BytesBody(_Body):
    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self.length = len(data)

    def piece(self, pos: int, n: int) -> memoryview:
        return self._view[pos : pos + n]


class _GenBody(_Body):
    """Bytes ``[start, start+length)`` of a generated file, sliced from the cached block."""

    def __init__(self, name: str, version: int, start: int, length: int) -> None:
        self.name, self.version, self.start, self.length = name, version, start, length
        self._small: memoryview | None = None
        if start + length <= _SMALL_BODY:
            self._small = memoryview(_prefix(name, version, start + length))[start:]

    def piece(self, pos: int, n: int) -> memoryview:
        if self._small is not None:
            return self._small[pos : pos + n]
        offset = (self.start + pos) % BLOCK_SIZE
        return memoryview(_doubled_block(self.name, self.version))[offset : offset + min(n, BLOCK_SIZE)]


@dataclass
class _Reply:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: _Body | None = None
    shaped: bool = False  # body-shaping params (chunked, stall_at, drop_at, rate, ...) apply
    header_bytes: int = 0  # /gen's header_bytes=<size>: filler header lines streamed after the others


@dataclass
class _Exchange:
    """What the request log needs to know about one request/response."""

    req: _Request
    status: int = 0
    body_bytes: int = 0
    finished: bool = False

    def record(self) -> dict[str, Any]:
        return {
            "path": self.req.path,
            "query": self.req.query,
            "method": self.req.method,
            "headers": dict(self.req.headers),
            "status": self.status,
            "body_bytes": self.body_bytes,
        }


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _flag(params: dict[str, str], name: str) -> bool:
    return params.get(name, "0").lower() not in ("", "0", "false", "no")


def _int_param(params: dict[str, str], name: str, default: int | None = None) -> int | None:
    if name not in params:
        return default
    try:
        value = int(params[name])
    except ValueError:
        raise _BadParam(f"{name} must be an integer, got {params[name]!r}") from None
    if value < 0:
        raise _BadParam(f"{name} must be >= 0")
    return value


def _float_param(params: dict[str, str], name: str) -> float | None:
    if name not in params:
        return None
    try:
        value = float(params[name])
    except ValueError:
        raise _BadParam(f"{name} must be a number, got {params[name]!r}") from None
    if not math.isfinite(value) or value < 0:
        raise _BadParam(f"{name} must be a finite number >= 0")
    return value


_INT_PARAMS = ("stall_at", "stall_times", "drop_at", "drop_times", "short", "hold_at")
_FLOAT_PARAMS = ("delay", "stall_for", "rate", "retry_after_date")


def _check_params(params: dict[str, str]) -> None:
    """Reject malformed numeric parameters up front, before anything is sent."""
    for name in _INT_PARAMS:
        _int_param(params, name)
    for name in _FLOAT_PARAMS:
        _float_param(params, name)


def _parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """``(first, last)`` inclusive, ``"unsatisfiable"``, or None to ignore the header
    (bad syntax or several ranges, which RFC 9110 lets a server answer with a plain 200)."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash:
        return None
    if not first:  # suffix range: the last N bytes
        if not last.isdigit():
            return None
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    a = int(first)
    if last and int(last) < a:
        return None
    if a >= size:
        return "unsatisfiable"
    return a, min(int(last), size - 1) if last else size - 1


def _accepts_gzip(value: str | None) -> bool:
    """Whether an Accept-Encoding header allows gzip (explicit q wins over ``*``)."""
    if not value:
        return False
    qualities: dict[str, float] = {}
    for item in value.split(","):
        coding, *options = (part.strip() for part in item.split(";"))
        q = 1.0
        for option in options:
            key, _, val = option.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(val)
                except ValueError:
                    q = 0.0
        if coding:
            qualities[coding.lower()] = q
    for coding in ("gzip", "x-gzip", "*"):
        if coding in qualities:
            return qualities[coding] > 0
    return False


def _content_disposition(filename: str) -> str:
    """Pass the (possibly hostile) name through verbatim, only escaped enough to stay one header."""
    filename = filename.replace("\r", " ").replace("\n", " ")
    quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
    if quoted.isascii():
        return f'attachment; filename="{quoted}"'
    fallback = quoted.encode("ascii", "replace").decode("ascii")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{urllib.parse.quote(filename, safe='')}"


def _client_gone(writer: asyncio.StreamWriter) -> bool:
    """Whether the client closed its end (FIN or RST) of a connection we are not reading from."""
    if writer.transport.is_closing():
        return True
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        with socket.fromfd(sock.fileno(), sock.family, sock.type) as peek:  # a dup: the loop owns sock
            return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _unsent_bytes(sock: Any) -> int:
    """Bytes still in the kernel send queue (Linux TIOCOUTQ); 0 where unsupported."""
    try:
        import fcntl
        import termios

        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return int(struct.unpack("i", raw)[0])
    except (ImportError, AttributeError, OSError, ValueError):
        return 0


def _make_certificate(directory: str, host: str) -> tuple[str, str]:
    """Write a self-signed cert (its own CA, so it can be a trust anchor) for 127.0.0.1/localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    alt_names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    try:
        extra = ipaddress.ip_address(host)
        if not extra.is_unspecified and str(extra) not in ("127.0.0.1", "::1"):
            alt_names.append(x509.IPAddress(extra))
    except ValueError:
        if host and host != "localhost":
            alt_names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.timezone.utc)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    certfile = os.path.join(directory, "cert.pem")
    keyfile = os.path.join(directory, "key.pem")
    with open(certfile, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(keyfile, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return certfile, keyfile


# --------------------------------------------------------------------------- server


class Origin:
    """The test origin: an asyncio HTTP/1.1 server running in a daemon thread.

    ``versions`` and ``texts`` are plain dicts the test mutates directly; the server reads
    them on every request.  ``stats`` is reset in place by :meth:`reset_stats`, so references
    to it stay valid.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, tls: bool = False) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.stats = OriginStats()
        self.versions: dict[str, int] = {}
        self.texts: dict[str, str] = {}
        #: Gates for ``hold=<name>``: a body held at one stops there until the test opens it
        #: with :meth:`release` (a closed gate is created on first use; opened gates stay open).
        self.gates: dict[str, threading.Event] = {}
        self._gates_lock = threading.Lock()
        #: Set False for long benchmarks so ``stats.requests`` does not grow without bound.
        self.record_requests = True
        self.certfile: str | None = None
        self.keyfile: str | None = None
        self._counters: collections.Counter[tuple[str, str]] = collections.Counter()
        self._counters_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        # Transports outlive their task while a TLS close waits for the peer's close_notify.
        self._transports: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._tmpdir: str | None = None
        self._last_activity = time.monotonic()

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """Base URL without trailing slash; wildcard binds are reached through loopback."""
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self) -> Origin:
        """Start serving in a daemon thread; returns once the socket is listening."""
        if self._thread is not None:
            return self
        ssl_context = None
        if self.tls:
            self._tmpdir = tempfile.mkdtemp(prefix="origin-tls-")
            self.certfile, self.keyfile = _make_certificate(self._tmpdir, self.host)
            ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ssl_context.load_cert_chain(self.certfile, self.keyfile)
            ssl_context.set_alpn_protocols(["http/1.1"])
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, args=(ssl_context,), name=f"origin-{self.port}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            error, self._start_error = self._start_error, None
            self._thread.join()
            self._thread = None
            self._cleanup_tmp()
            raise error
        return self

    def stop(self) -> None:
        """Close the listener and every connection (abruptly), then end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None
        self._loop = None
        self._cleanup_tmp()

    def gate(self, name: str) -> threading.Event:
        """The gate ``hold=<name>`` waits on (closed until :meth:`release`)."""
        with self._gates_lock:
            return self.gates.setdefault(name, threading.Event())

    def release(self, name: str) -> None:
        """Open the gate ``name``: held bodies go on, later ones pass without stopping."""
        self.gate(name).set()

    def reset_stats(self) -> None:
        """Zero the counters and the fail/stall/drop per-key state (versions/texts are kept)."""
        self.stats._reset()
        with self._counters_lock:
            self._counters.clear()

    def wait_ended(self, paths: Iterable[str], timeout: float) -> bool:
        """Wait (up to *timeout* s) until every request begun for *paths* has ended: a request
        is counted in ``stats.requests`` when it ends, and one whose client was killed ends only
        once the origin sees the connection gone. False if one is still going. (Not ``inflight``:
        this origin may still serve another test's client.)"""
        paths = set(paths)
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats.snapshot()
            ended = collections.Counter(r["path"] for r in stats.requests if r["path"] in paths)
            if all(ended[p] >= stats.hits_by_path[p] for p in paths):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def idle_seconds(self) -> float:
        """Seconds since the last request started or ended (0 while one is in flight)."""
        if self.stats.inflight:
            return 0.0
        return time.monotonic() - self._last_activity

    def __enter__(self) -> Origin:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._thread is not None else "stopped"
        return f"<Origin {self.url} {state}>"

    def _cleanup_tmp(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _run(self, ssl_context: ssl.SSLContext | None) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._on_loop_exception)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(
                    self._serve_connection, self.host, self.port,
                    ssl=ssl_context, limit=_MAX_HEAD, backlog=1024,
                )
            )
        except BaseException as exc:  # noqa: BLE001 - handed to start() in the caller's thread
            self._start_error = exc
            loop.close()
            self._ready.set()
            return
        self.port = self._server.sockets[0].getsockname()[1]
        self._loop = loop
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for transport in list(self._transports):
            transport.abort()
        await asyncio.sleep(0)

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Clients hanging up (mid-TLS-handshake, mid-body) are routine here, not worth a traceback.
        log.debug("asyncio: %s", context.get("message"), exc_info=context.get("exception"))

    # ---------------------------------------------------------------- connections

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._transports.add(writer.transport)
        self.stats._connected()
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.transport.set_write_buffer_limits(high=_HIGH_WATER)
        try:
            while True:
                try:
                    req = await self._read_request(reader, writer)
                except _HttpError as exc:
                    await self._send_simple_and_close(writer, exc.status, str(exc))
                    break
                if req is None or not await self._respond(req, writer):
                    break
        except asyncio.CancelledError:
            pass  # stop(): the transport is aborted by _shutdown
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.debug("connection ended early: %r", exc)
        except Exception:
            log.exception("test origin: unexpected error while serving a connection")
        finally:
            self._connections.discard(task)
            if not writer.transport.is_closing():
                writer.close()  # flushes what is buffered, then FIN

    async def _read_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Request | None:
        """Parse one request head (and discard its body); None on a clean end of stream."""
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    log.debug("truncated request head: %r", exc.partial[:200])
                return None
            except asyncio.LimitOverrunError:
                raise _HttpError(431) from None
            head = head.lstrip(b"\r\n")  # stray CRLFs between pipelined requests are allowed
            if head:
                break
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _HttpError(400, "malformed request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise _HttpError(400, "malformed header line")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if target.startswith("/"):
            path, _, query = target.partition("?")
            query = query.partition("#")[0]
        elif target.lower().startswith(("http://", "https://")):  # absolute-form (proxy style)
            split = urllib.parse.urlsplit(target)
            path, query = split.path or "/", split.query
        else:
            raise _HttpError(400, "unsupported request target")
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
        await self._discard_request_body(reader, writer, headers, version)
        return _Request(
            method=method,
            path=path,
            query=query,
            version=version,
            headers=headers,
            params=dict(urllib.parse.parse_qsl(query, keep_blank_values=True)),
            keep_alive=keep_alive,
        )

    async def _discard_request_body(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str], version: str
    ) -> None:
        """Request bodies are never used, but must be consumed to keep the connection in sync."""
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length_text = headers.get("content-length")
        if not chunked and not length_text:
            return
        if version == "HTTP/1.1" and headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if chunked:
            while True:
                size_line = await reader.readuntil(b"\r\n")
                try:
                    size = int(size_line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise _HttpError(400, "bad chunk size") from None
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    return
                await reader.readexactly(size + 2)
        try:
            remaining = int(length_text or "0")
        except ValueError:
            raise _HttpError(400, "bad Content-Length") from None
        while remaining > 0:
            remaining -= len(await reader.readexactly(min(remaining, 1 << 20)))

    async def _send_simple_and_close(self, writer: asyncio.StreamWriter, status: int, text: str) -> None:
        body = f"{status} {text}\n".encode()
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), ("Connection", "close")]
        head = self._head(status, headers)
        if not writer.transport.is_closing():
            writer.write(head + body)
            await writer.drain()

    # ---------------------------------------------------------------- one request

    async def _respond(self, req: _Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; returns whether the connection can carry another one."""
        exchange = _Exchange(req)
        self.stats._begin(req.path)
        self._last_activity = time.monotonic()
        finish = functools.partial(self._finish, exchange)
        try:
            try:
                _check_params(req.params)
                reply = self._route(req)
                delay = _float_param(req.params, "delay")
            except _BadParam as exc:
                reply, delay = self._simple(400, f"bad parameter: {exc}\n"), None
            if delay:
                await asyncio.sleep(delay)
            return await self._send(exchange, reply, writer, finish)
        finally:
            finish()  # no-op unless the response ended abnormally

    def _finish(self, exchange: _Exchange) -> None:
        """Account for the end of a request.  Called just *before* the response's last byte
        (or its RST/FIN) is handed to the socket, so a client that has seen the whole response
        is guaranteed to find it in ``stats.requests`` with ``inflight`` already decremented."""
        if exchange.finished:
            return
        exchange.finished = True
        self.stats._end(exchange.record() if self.record_requests else None)
        self._last_activity = time.monotonic()

    def _take(self, feature: str, req: _Request, times: int) -> tuple[bool, int]:
        """Count one use of ``feature`` for this path+query; True while within the first
        ``times`` uses (0 = always)."""
        with self._counters_lock:
            self._counters[(feature, req.key)] += 1
            count = self._counters[(feature, req.key)]
        return (times == 0 or count <= times), count

    def _simple(self, status: int, text: str, headers: list[tuple[str, str]] | None = None) -> _Reply:
        body = None if status in (204, 304) else _BytesBody(text.encode())
        return _Reply(status, [("Content-Type", "text/plain; charset=utf-8"), *(headers or [])], body)

    def _retry_after(self, params: dict[str, str]) -> list[tuple[str, str]]:
        if "retry_after" in params:
            return [("Retry-After", params["retry_after"])]  # verbatim, so tests can send garbage
        seconds = _float_param(params, "retry_after_date")
        if seconds is not None:
            return [("Retry-After", email.utils.formatdate(time.time() + math.ceil(seconds), usegmt=True))]
        return []

    def _redirect(self, location: str, query: str) -> _Reply:
        if query:
            location = f"{location}?{query}"
        return self._simple(302, f"redirecting to {location}\n", [("Location", location)])

    def _route(self, req: _Request) -> _Reply:
        if req.method not in ("GET", "HEAD"):
            return self._simple(405, "only GET and HEAD\n", [("Allow", "GET, HEAD")])
        params = req.params
        if "fail" in params:
            code_text, _, times_text = params["fail"].partition(":")
            try:
                code, times = int(code_text), int(times_text or "1")
            except ValueError:
                raise _BadParam("fail must be CODE:N") from None
            if not 200 <= code <= 599 or times < 0:
                raise _BadParam("fail must be CODE:N with 200 <= CODE <= 599 and N >= 0")
            failing, count = self._take("fail", req, times)
            if failing:
                text = f"{code} {_phrase(code)} (injected failure {count}/{times or 'always'})\n"
                return self._simple(code, text, self._retry_after(params))
        parts = req.path.split("/")
        kind = parts[1] if len(parts) > 1 else ""
        if kind == "gen" and len(parts) >= 4:
            return self._route_gen(req, parts[2], "/".join(parts[3:]))
        if kind == "disposition" and len(parts) >= 4:
            filename = params.get("filename", urllib.parse.unquote("/".join(parts[3:])))
            return self._route_gen(req, parts[2], "/".join(parts[3:]), disposition=filename)
        if kind == "status" and len(parts) == 3 and parts[2].isdigit() and 200 <= int(parts[2]) <= 599:
            code = int(parts[2])
            return self._simple(code, f"{code} {_phrase(code)}\n", self._retry_after(params))
        if kind == "redirect" and len(parts) >= 4 and parts[2].isdigit() and "/".join(parts[3:]):
            n, target = int(parts[2]), "/".join(parts[3:])
            return self._redirect(f"/redirect/{n - 1}/{target}" if n > 0 else f"/{target}", req.query)
        if kind == "goto" and "to" in params:  # an absolute redirect, to another origin too
            return self._simple(302, f"redirecting to {params['to']}\n", [("Location", params["to"])])
        if kind == "loop" and len(parts) >= 3:
            return self._redirect(req.path, req.query)
        if kind == "loop2" and len(parts) >= 4 and parts[2] in ("a", "b"):
            other = "b" if parts[2] == "a" else "a"
            return self._redirect("/".join(["", "loop2", other, *parts[3:]]), req.query)
        if kind == "text" and len(parts) >= 3:
            text = self.texts.get(urllib.parse.unquote("/".join(parts[2:])))
            if text is not None:
                body = _BytesBody(text.encode())
                return _Reply(200, [("Content-Type", "text/plain; charset=utf-8")], body, shaped=True)
        return self._simple(404, "not found\n")

    def _route_gen(self, req: _Request, size_text: str, raw_name: str, disposition: str | None = None) -> _Reply:
        """/gen and /disposition: validators, conditional requests, ranges, gzip.

        ``range_size=<size>`` makes a misbehaving server: Range requests are answered as if the
        file had ``<size>`` bytes (Content-Range total and body), while the ETag and
        Last-Modified stay those of the full response, so only the length tells the two apart.

        ``header_bytes=<size>`` adds that many bytes of ``X-Filler-N: aaa…`` header lines (4 KiB
        each) to a 200 or 206, streamed as they are made (see ``_write_head``)."""
        name = urllib.parse.unquote(raw_name)
        try:
            size = parse_size(size_text)
        except ValueError:
            return self._simple(404, f"bad size {size_text!r}\n")
        range_size = size
        if "range_size" in req.params:
            try:
                range_size = parse_size(req.params["range_size"])
            except ValueError:
                raise _BadParam(f"range_size must be a size, got {req.params['range_size']!r}") from None
        header_bytes = 0
        if "header_bytes" in req.params:
            try:
                header_bytes = parse_size(req.params["header_bytes"])
            except ValueError:
                raise _BadParam(f"header_bytes must be a size, got {req.params['header_bytes']!r}") from None
        if not name:
            return self._simple(404, "missing name\n")
        params = req.params
        version = self.versions.get(req.path, 0)
        ranges = not _flag(params, "no_range")
        etag = lm = None
        if not _flag(params, "no_validators"):
            etag, lm = _etag(name, size, version), _last_modified(version)
        validators = [("ETag", etag), ("Last-Modified", _http_date(lm))] if etag and lm else []
        gzip_mode = params.get("gzip", "0").lower()
        gzip_on = gzip_mode not in ("", "0", "false", "no")
        vary = [("Vary", "Accept-Encoding")] if gzip_on else []

        if self._not_modified(req, etag, lm):
            return _Reply(304, validators + vary)

        headers = [("Content-Type", "application/octet-stream"), *validators, *vary]
        if _flag(params, "colonless_header"):  # a header line without a colon (browsers skip it)
            headers.append(("", "X-Broken-Header-Without-Colon"))
        if disposition is not None:
            headers.append(("Content-Disposition", _content_disposition(disposition)))
        if gzip_on and (gzip_mode == "force" or _accepts_gzip(req.headers.get("accept-encoding"))):
            headers.append(("Content-Encoding", "gzip"))
            return _Reply(200, headers, _BytesBody(_gzip_body(name, size, version)), shaped=True,
                          header_bytes=header_bytes)
        if ranges:
            headers.append(("Accept-Ranges", "bytes"))
            range_header = req.headers.get("range")
            if range_header is not None and self._if_range_matches(req, etag, lm):
                parsed = _parse_range(range_header, range_size)
                if parsed == "unsatisfiable":
                    return self._simple(416, "range not satisfiable\n", [("Content-Range", f"bytes */{range_size}")])
                if isinstance(parsed, tuple):
                    first, last = parsed
                    headers.append(("Content-Range", f"bytes {first}-{last}/{range_size}"))
                    return _Reply(206, headers, _GenBody(name, version, first, last - first + 1), shaped=True,
                                  header_bytes=header_bytes)
        return _Reply(200, headers, _GenBody(name, version, 0, size), shaped=True, header_bytes=header_bytes)

    @staticmethod
    def _not_modified(req: _Request, etag: str | None, lm: dt.datetime | None) -> bool:
        if_none_match = req.headers.get("if-none-match")
        if if_none_match is not None:  # takes precedence over If-Modified-Since (RFC 9110)
            if etag is None:
                return False
            tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
            return "*" in tags or etag in tags
        if_modified_since = req.headers.get("if-modified-since")
        if if_modified_since is not None and lm is not None:
            since = _parse_http_date(if_modified_since)
            return since is not None and since >= lm
        return False

    @staticmethod
    def _if_range_matches(req: _Request, etag: str | None, lm: dt.datetime | None) -> bool:
        """If-Range needs a strong match: the exact ETag, or exactly the Last-Modified date."""
        value = req.headers.get("if-range")
        if value is None:
            return True
        value = value.strip()
        if value.startswith(('"', "W/")):
            return etag is not None and value == etag
        when = _parse_http_date(value)
        return when is not None and lm is not None and when == lm

    # ---------------------------------------------------------------- writing

    @staticmethod
    def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [
            f"HTTP/1.1 {status} {_phrase(status)}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
            f"Server: {SERVER_NAME}",
        ]
        lines.extend(f"{name}: {value}" if name else value for name, value in headers)  # "": a bare line
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")

    async def _send(
        self, exchange: _Exchange, reply: _Reply, writer: asyncio.StreamWriter, finish: Callable[[], None]
    ) -> bool:
        """Write the reply, applying the body-shaping parameters; returns keep-alive.
        ``finish`` is called right before the final byte, RST or FIN goes out."""
        req, params, body = exchange.req, exchange.req.params, reply.body
        exchange.status = reply.status
        keep = req.keep_alive
        headers = list(reply.headers)
        has_body = body is not None and reply.status not in (204, 304)
        framing = "length"
        if reply.shaped and has_body:
            if _flag(params, "no_length"):
                framing = "close"
            elif _flag(params, "chunked"):
                framing = "chunked" if req.version == "HTTP/1.1" else "close"
        if has_body and body is not None:
            if framing == "length":
                headers.append(("Content-Length", str(body.length)))
            elif framing == "chunked":
                headers.append(("Transfer-Encoding", "chunked"))
            else:
                keep = False
        if not keep:
            headers.append(("Connection", "close"))
        elif req.version == "HTTP/1.0":
            headers.append(("Connection", "keep-alive"))

        send_body = has_body and body is not None and req.method != "HEAD"
        events: list[tuple[int, int, str]] = []  # (body offset, tie order, action)
        stall_for = 0.0
        if send_body and reply.shaped and body is not None:
            total = body.length
            stall_at = _int_param(params, "stall_at")
            if stall_at is not None and stall_at < total:
                stall_for = _float_param(params, "stall_for") or 0.0
                if self._take("stall", req, _int_param(params, "stall_times", 1) or 0)[0]:
                    events.append((stall_at, 0, "stall"))
            short = _int_param(params, "short")
            if short is not None and short < total:
                events.append((short, 1, "short"))
            hold_at = _int_param(params, "hold_at", 0)
            if "hold" in params and hold_at is not None and hold_at < total:
                events.append((hold_at, -1, "hold"))
            drop_at = _int_param(params, "drop_at")
            if drop_at is not None and drop_at < total:
                if self._take("drop", req, _int_param(params, "drop_times", 1) or 0)[0]:
                    events.append((drop_at, 2, "drop"))
        rate = _float_param(params, "rate") if reply.shaped else None
        chunked = framing == "chunked"

        head = self._head(reply.status, headers)
        if not send_body or body is None:
            self._check_open(writer)
            finish()
            await self._write_head(writer, head, reply.header_bytes)
            await writer.drain()
            return keep
        self._check_open(writer)
        await self._write_head(writer, head, reply.header_bytes)
        pos = 0
        for offset, _, action in sorted(events):
            await self._write_body(exchange, writer, body, pos, offset, chunked, rate)
            pos = offset
            if action == "stall":
                await writer.drain()
                await asyncio.sleep(stall_for)
                if _client_gone(writer):  # it gave up on the stall: nothing more goes out (or is counted)
                    finish()
                    writer.close()
                    return False
            elif action == "hold":
                await writer.drain()
                await self._hold(params["hold"], writer)
            elif action == "short":
                await writer.drain()
                finish()
                writer.close()  # clean FIN, fewer bytes than declared
                return False
            else:
                await self._reset_connection(writer, finish)
                return False
        await self._write_body(exchange, writer, body, pos, body.length, chunked, rate, None if chunked else finish)
        if chunked:
            self._check_open(writer)
            finish()
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        return keep

    async def _write_head(self, writer: asyncio.StreamWriter, head: bytes, filler: int) -> None:
        """Write *head*; with *filler* (header_bytes=), that many bytes of ``X-Filler-N: aaa…``
        lines go before the blank line that ends it, made 64 KiB at a time: hundreds of MiB of
        headers cost the server no more than its write buffer."""
        if not filler:
            writer.write(head)
            return
        writer.write(head[:-2])  # all but the blank line
        n = 0
        while filler > 0:
            lines = []
            for _ in range(16):  # 64 KiB a write
                prefix = b"X-Filler-%d: " % n
                lines.append(prefix + b"a" * max(1, min(_FILLER_LINE, filler) - len(prefix) - 2) + b"\r\n")
                filler -= len(lines[-1])
                n += 1
                if filler <= 0:
                    break
            self._check_open(writer)
            writer.write(b"".join(lines))
            await writer.drain()  # waits only above the high-water mark...
            await asyncio.sleep(0)  # ...so yield: under TLS a client gone is noticed only by the loop
        writer.write(b"\r\n")

    async def _hold(self, name: str, writer: asyncio.StreamWriter) -> None:
        """hold=<name>: wait until the test opens the gate (or the client is gone, or _HOLD_MAX)."""
        gate = self.gate(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _HOLD_MAX
        while not gate.is_set() and not _client_gone(writer) and loop.time() < deadline:
            await asyncio.sleep(0.02)

    @staticmethod
    def _check_open(writer: asyncio.StreamWriter) -> None:
        # Writing to a closed asyncio transport is silently dropped (and eventually warned
        # about); raise instead so the request ends as "client went away".
        if writer.transport.is_closing():
            raise ConnectionResetError("client went away")

    async def _write_body(
        self,
        exchange: _Exchange,
        writer: asyncio.StreamWriter,
        body: _Body,
        start: int,
        stop: int,
        chunked: bool,
        rate: float | None,
        before_last: Callable[[], None] | None = None,
    ) -> None:
        """Send body bytes ``[start, stop)``, optionally paced to ``rate`` bytes/s; bytes are
        counted before they are written and ``before_last`` runs before the last piece."""
        if start >= stop and before_last is not None:
            before_last()
        loop = asyncio.get_running_loop()
        step = BLOCK_SIZE if not rate else max(1, min(BLOCK_SIZE, int(rate / 20)))
        began = loop.time()
        pos = start
        path = exchange.req.path
        while pos < stop:
            self._check_open(writer)
            data = body.piece(pos, min(step, stop - pos))
            n = len(data)
            pos += n
            exchange.body_bytes += n
            self.stats._sent(path, n)
            if pos >= stop and before_last is not None:
                before_last()
            if chunked:
                writer.write(b"%x\r\n" % n)
                writer.write(data)
                writer.write(b"\r\n")
            else:
                writer.write(data)
            await writer.drain()
            if rate:
                ahead = began + (pos - start) / rate - loop.time()
                if ahead > 0:
                    await asyncio.sleep(ahead)

    async def _reset_connection(self, writer: asyncio.StreamWriter, finish: Callable[[], None]) -> None:
        """drop_at: let the bytes before the drop reach the client, then send a TCP RST
        (SO_LINGER 0), which clients see as a connection reset rather than a clean end."""
        transport = writer.transport
        await writer.drain()
        # Under TLS the socket transport sits below the SSL one and keeps its own buffer.
        inner = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
        sock = writer.get_extra_info("socket")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _RESET_FLUSH_TIMEOUT
        while loop.time() < deadline and not transport.is_closing():
            pending = transport.get_write_buffer_size()
            if inner is not None:
                pending += inner.get_write_buffer_size()
            if sock is not None:
                pending += _unsent_bytes(sock)
            if not pending:
                break
            await asyncio.sleep(0.002)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finish()
        transport.abort()


# --------------------------------------------------------------------------- command line


def _probe(host: str, port: int, tls: bool) -> str | None:
    """None if nothing listens on host:port, "ours" if a test origin answers, else "other"."""
    url_host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        socket.create_connection((url_host, port), timeout=1).close()
    except OSError:
        return None
    conn: http.client.HTTPConnection
    if tls:
        context = ssl._create_unverified_context()  # our own self-signed certificate
        conn = http.client.HTTPSConnection(url_host, port, timeout=2, context=context)
    else:
        conn = http.client.HTTPConnection(url_host, port, timeout=2)
    try:
        conn.request("GET", "/status/200")
        response = conn.getresponse()
        response.read()
        return "ours" if response.getheader("Server") == SERVER_NAME else "other"
    except (OSError, http.client.HTTPException):
        return "other"
    finally:
        conn.close()


def _serve_until_idle(origin: Origin, idle_exit: float, announce: bool) -> None:
    """Block until SIGTERM/SIGINT or ``idle_exit`` seconds without requests (0 = never)."""
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    while not done.wait(0.25):
        if idle_exit and origin.idle_seconds() >= idle_exit:
            if announce:
                print(f"no request for {idle_exit:g} s, exiting", flush=True)
            break


def _detach(args: argparse.Namespace, idle_exit: float) -> int:
    """Fork; the child serves, the parent waits until it listens, prints the URL and exits 0."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace").strip()
        if message.startswith("OK "):
            print(f"serving on {message[3:]}", flush=True)
            idle = f"exits after {idle_exit:g} s without requests" if idle_exit else "runs until killed"
            print(f"(detached as pid {pid}; {idle})", file=sys.stderr, flush=True)
            return 0
        print(f"error: {message.removeprefix('ERR ') or 'the origin failed to start'}", file=sys.stderr)
        return 1
    # child
    os.close(read_fd)
    status = 0
    try:
        os.setsid()
        try:
            origin = Origin(args.host, args.port, tls=args.tls).start()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(write_fd, f"ERR {exc}\n".encode())
            os._exit(1)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)  # so a `$(...)` capture in the caller's shell can finish
        os.write(write_fd, f"OK {origin.url}\n".encode())
        os.close(write_fd)
        try:
            _serve_until_idle(origin, idle_exit, announce=False)
        finally:
            origin.stop()
    except BaseException:  # noqa: BLE001 - nobody is listening any more
        status = 1
    os._exit(status)



@dataclass(frozen=True)
class Gen:
    """One generated file of the origin, and where fetcher names it in the store."""

    name: str
    size: int

    def url(self, origin: Origin) -> str:
        return f"{origin.url}/gen/{self.size}/{self.name}"

    def path(self, origin: Origin) -> str:
        return f"{origin.url.removeprefix('http://')}/gen/{self.size}/{self.name}"

    @property
    def digest(self) -> str:
        return expected_digest(self.name, self.size)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.origin``: run the test origin in the foreground or detached."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.origin",
        description="Deterministic HTTP/1.1 test origin (see tests/origin.py for the URL scheme).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_CLI_PORT, help=f"port (default {DEFAULT_CLI_PORT}; 0 = any)"
    )
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a fresh self-signed certificate")
    parser.add_argument("--detach", action="store_true", help="fork into the background once listening; parent exits 0")
    parser.add_argument(
        "--idle-exit", type=float, default=None, metavar="SECONDS",
        help="exit after this many seconds without a request (default 600 when detached, else 0 = never)",
    )
    args = parser.parse_args(argv)
    idle_exit = args.idle_exit if args.idle_exit is not None else (600.0 if args.detach else 0.0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.port:
        existing = _probe(args.host, args.port, args.tls)
        url = Origin(args.host, args.port, tls=args.tls).url
        if existing == "ours" and args.detach:
            print(f"note: a test origin is already serving on {url}; leaving it running", file=sys.stderr)
            print(f"serving on {url}", flush=True)
            return 0
        if existing is not None:
            what = "a test origin" if existing == "ours" else "something else"
            print(f"error: {args.host}:{args.port} is already in use by {what}", file=sys.stderr)
            return 1
    if args.detach:
        return _detach(args, idle_exit)
    try:
        origin = Origin(args.host, args.port, tls=args.tls).start()
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"serving on {origin.url}", flush=True)
    if origin.certfile:
        print(f"certificate: {origin.certfile}", flush=True)
    try:
        _serve_until_idle(origin, idle_exit, announce=True)
    finally:
        origin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
