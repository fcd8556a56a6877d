"""Streamed downloads through a real HTTP proxy (proxy.py, from the test extra) on loopback.

The proxy comes from the environment (http_proxy/https_proxy), as a user's would: Scrapy's
HttpProxyMiddleware turns it into meta ``proxy`` and a Proxy-Authorization header, and the
handler sends http:// URLs to the proxy and tunnels https:// ones with CONNECT. Evidence
that the proxy carried a request is its own access log (and, for http, its Via header).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Fetch
from tests.origin import Origin, expected_digest

MiB = 1 << 20


@dataclass
class Proxy:
    """A running proxy.py: its URL (no credentials) and its access log."""

    port: int
    log_file: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def with_credentials(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


def start_proxy(folder: Path, *extra: str) -> Iterator[Proxy]:
    folder.mkdir(parents=True, exist_ok=True)
    port_file, log_file = folder / "port", folder / "proxy.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
         "--num-workers", "1", "--num-acceptors", "1", "--log-level", "INFO", "--log-file", str(log_file), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "proxy.py did not start"
            time.sleep(0.05)
        yield Proxy(int(port_file.read_text().split()[0]), log_file)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its workers are in its own session
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    yield from start_proxy(tmp_path_factory.mktemp("proxy"))


@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    yield from start_proxy(tmp_path_factory.mktemp("auth-proxy"), "--basic-auth", "pxuser:px-pass")


@pytest.fixture(scope="module")
def tls_origin() -> Iterator[Origin]:
    with Origin(tls=True).start() as o:
        yield o


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The fetch fixture's runs inherit this process's environment: start with no proxy at all."""
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def no_proxy_credentials_reached(*origins: Origin) -> None:
    for o in origins:
        for request in o.stats.snapshot().requests:
            assert "proxy-authorization" not in request["headers"], request


def test_http_goes_through_the_proxy_and_is_streamed(fetch: Fetch, origin: Origin, proxy: Proxy,
                                                     env: pytest.MonkeyPatch) -> None:
    env.setenv("http_proxy", proxy.url)
    path = f"/gen/{8 * MiB}/via-proxy.bin"
    url = origin.url + path
    run = fetch(f"{url}\n")
    assert run.returncode == 0, run.log
    # Streamed, not held in memory: a body that came whole is said once, with its URL.
    assert "came in memory, not streamed" not in run.log, run.log[-3000:]
    record = run.record(url)
    assert record["status"] == "downloaded" and record["checksum"] == expected_digest("via-proxy.bin", 8 * MiB)
    [seen] = [r for r in origin.stats.snapshot().requests if r["path"] == path]
    assert "proxy.py" in seen["headers"].get("via", "")
    assert f"GET {origin.url.removeprefix('http://')}{path} - 200" in proxy.log


def test_https_goes_through_a_connect_tunnel(fetch: Fetch, tls_origin: Origin, proxy: Proxy,
                                             env: pytest.MonkeyPatch) -> None:
    env.setenv("https_proxy", proxy.url)
    tls_origin.reset_stats()
    url = f"{tls_origin.url}/gen/{2 * MiB}/tunnel.bin"
    run = fetch(f"{url}\n", settings={"DOWNLOAD_VERIFY_CERTIFICATES": False})
    assert run.returncode == 0, run.log
    assert run.record(url)["checksum"] == expected_digest("tunnel.bin", 2 * MiB)
    assert f"CONNECT {tls_origin.url.removeprefix('https://')}" in proxy.log
    assert tls_origin.stats.snapshot().hits == 1


def test_proxy_credentials_go_to_the_proxy_only(fetch: Fetch, origin: Origin, tls_origin: Origin,
                                                auth_proxy: Proxy, env: pytest.MonkeyPatch) -> None:
    env.setenv("http_proxy", auth_proxy.with_credentials("pxuser", "px-pass"))
    env.setenv("https_proxy", auth_proxy.with_credentials("pxuser", "px-pass"))
    tls_origin.reset_stats()
    plain, tunneled = f"{origin.url}/gen/300k/auth-plain.bin", f"{tls_origin.url}/gen/300k/auth-tls.bin"
    run = fetch(f"{plain}\n{tunneled}\n", settings={"DOWNLOAD_VERIFY_CERTIFICATES": False})
    assert run.returncode == 0, run.log
    assert run.record(plain)["checksum"] == expected_digest("auth-plain.bin", 300 * 1024)
    assert run.record(tunneled)["checksum"] == expected_digest("auth-tls.bin", 300 * 1024)
    assert "ProxyAuthenticationFailed" not in auth_proxy.log
    assert f"GET {origin.url.removeprefix('http://')}/gen/300k/auth-plain.bin - 200" in auth_proxy.log
    assert f"CONNECT {tls_origin.url.removeprefix('https://')}" in auth_proxy.log
    no_proxy_credentials_reached(origin, tls_origin)
    assert origin.stats.hits == 1 and tls_origin.stats.hits == 1


def test_wrong_proxy_credentials_fail_clearly(fetch: Fetch, origin: Origin, tls_origin: Origin,
                                              auth_proxy: Proxy, env: pytest.MonkeyPatch) -> None:
    env.setenv("http_proxy", auth_proxy.with_credentials("pxuser", "wrong"))
    env.setenv("https_proxy", auth_proxy.with_credentials("pxuser", "wrong"))
    tls_origin.reset_stats()
    plain, tunneled = f"{origin.url}/gen/1k/denied.bin", f"{tls_origin.url}/gen/1k/denied.bin"
    started = time.monotonic()
    run = fetch(f"{plain}\n{tunneled}\n", settings={"DOWNLOAD_VERIFY_CERTIFICATES": False, "RETRY_TIMES": 1},
                timeout=60)
    assert run.returncode == 1, run.log
    assert time.monotonic() - started < 30  # bounded by retries, not by a timeout
    assert run.record(plain)["status"] == "failed" and run.record(plain)["http_status"] == 407
    record = run.record(tunneled)
    assert record["status"] == "failed" and "407" in record["error"] and "tunnel" in record["error"]
    assert "wrong" not in run.log and "wrong" not in run.store.joinpath("manifest.jsonl").read_text()
    assert origin.stats.hits == 0 and tls_origin.stats.hits == 0


def test_url_credentials_through_a_proxy(fetch: Fetch, origin: Origin, proxy: Proxy,
                                         env: pytest.MonkeyPatch) -> None:
    """The origin's own user:password travel as Authorization, never in the request line the proxy sees."""
    env.setenv("http_proxy", proxy.url)
    path = "/gen/10k/userinfo.bin"
    url = origin.url.replace("://", "://alice:s3cret@") + path
    run = fetch(f"{url}\n")
    assert run.returncode == 0, run.log
    [seen] = [r for r in origin.stats.snapshot().requests if r["path"] == path]
    assert seen["headers"]["authorization"] == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert "via" in seen["headers"]
    assert f"GET {origin.url.removeprefix('http://')}{path}" in proxy.log and "s3cret" not in proxy.log
