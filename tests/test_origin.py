"""Fast checks of the test origin itself, so integration-test failures can be trusted to be
fetcher's and not the origin's."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.origin import (
    BLOCK_SIZE,
    SERVER_NAME,
    Origin,
    content_bytes,
    expected_digest,
    parse_size,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def origin() -> Iterator[Origin]:
    with Origin().start() as o:
        yield o


def get(
    o: Origin, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", o.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def read_until_cut(response: http.client.HTTPResponse) -> bytes:
    """Read whatever arrives before the server cuts the body short."""
    received = bytearray()
    try:
        while chunk := response.read1(65536):
            received += chunk
    except (ConnectionError, http.client.IncompleteRead) as exc:
        if isinstance(exc, http.client.IncompleteRead):
            received += exc.partial
    return bytes(received)


def test_parse_size() -> None:
    assert [parse_size(s) for s in ("123", "10k", "4M", "2g", "0")] == [123, 10240, 4 << 20, 2 << 30, 0]
    for bad in ("", "k", "1.5m", "-1", "12t"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_content_is_deterministic_periodic_and_sliceable() -> None:
    size = 3 * BLOCK_SIZE + 17
    whole = content_bytes("dir/a.bin", size)
    assert len(whole) == size
    assert whole[:BLOCK_SIZE] == whole[BLOCK_SIZE : 2 * BLOCK_SIZE]
    window = content_bytes("dir/a.bin", size, start=BLOCK_SIZE - 5, end=BLOCK_SIZE + 5)
    assert window == whole[BLOCK_SIZE - 5 : BLOCK_SIZE + 5]
    assert content_bytes("dir/a.bin", 10) == whole[:10]  # small-file fast path agrees with the block
    assert content_bytes("dir/a.bin", 100, version=1) != whole[:100]
    assert expected_digest("dir/a.bin", size) == hashlib.sha256(whole).hexdigest()
    assert expected_digest("dir/a.bin", size, algorithm="md5") == hashlib.md5(whole).hexdigest()


def test_full_body_and_headers(origin: Origin) -> None:
    size = 2 * BLOCK_SIZE + 1000
    response, body = get(origin, f"/gen/{size}/sub/dir/a.bin")
    assert response.status == 200
    assert body == content_bytes("sub/dir/a.bin", size)
    assert hashlib.sha256(body).hexdigest() == expected_digest("sub/dir/a.bin", size)
    assert response.getheader("Content-Length") == str(size)
    assert response.getheader("Content-Type") == "application/octet-stream"
    assert response.getheader("Accept-Ranges") == "bytes"
    assert response.getheader("ETag", "").startswith('"')
    assert response.getheader("Last-Modified") == "Mon, 01 Jan 2024 00:00:00 GMT"
    assert response.getheader("Server") == SERVER_NAME

    head, head_body = get(origin, f"/gen/{size}/sub/dir/a.bin", method="HEAD")
    assert head.status == 200 and head_body == b"" and head.getheader("Content-Length") == str(size)
    stats = origin.stats.snapshot()
    assert stats.hits == 2 and stats.bytes_sent == size
    assert stats.requests[0]["status"] == 200 and stats.requests[1]["method"] == "HEAD"


def test_range_and_unsatisfiable(origin: Origin) -> None:
    size = 2 * 1024 * 1024
    first, last = BLOCK_SIZE - 100, BLOCK_SIZE + 99  # crosses the block period
    response, body = get(origin, "/gen/2m/r.bin", {"Range": f"bytes={first}-{last}"})
    assert response.status == 206
    assert response.getheader("Content-Range") == f"bytes {first}-{last}/{size}"
    assert body == content_bytes("r.bin", size, start=first, end=last + 1)

    response, body = get(origin, "/gen/2m/r.bin", {"Range": f"bytes={size - 10}-"})
    assert response.status == 206 and body == content_bytes("r.bin", size)[-10:]

    response, _ = get(origin, "/gen/2m/r.bin", {"Range": f"bytes={size}-"})
    assert response.status == 416 and response.getheader("Content-Range") == f"bytes */{size}"

    response, body = get(origin, "/gen/2m/r.bin?no_range=1", {"Range": "bytes=5-"})
    assert response.status == 200 and len(body) == size


def test_if_range_mismatch_after_version_bump(origin: Origin) -> None:
    path = "/gen/10k/v.bin"
    response, _ = get(origin, path)
    old_etag, old_date = response.getheader("ETag"), response.getheader("Last-Modified")
    origin.versions[path] = 1
    for validator in (old_etag, old_date):
        response, body = get(origin, path, {"Range": "bytes=100-", "If-Range": validator})
        assert response.status == 200
        assert body == content_bytes("v.bin", 10240, version=1) != content_bytes("v.bin", 10240)
    new_etag = response.getheader("ETag")
    assert new_etag != old_etag
    response, body = get(origin, path, {"Range": "bytes=100-", "If-Range": new_etag})
    assert response.status == 206 and body == content_bytes("v.bin", 10240, version=1)[100:]


def test_conditional_304(origin: Origin) -> None:
    response, _ = get(origin, "/gen/1k/c.bin")
    etag, date = response.getheader("ETag"), response.getheader("Last-Modified")
    response, body = get(origin, "/gen/1k/c.bin", {"If-None-Match": etag})
    assert response.status == 304 and body == b""
    response, body = get(origin, "/gen/1k/c.bin", {"If-Modified-Since": date})
    assert response.status == 304
    response, body = get(origin, "/gen/1k/c.bin", {"If-None-Match": '"other"'})
    assert response.status == 200 and len(body) == 1024
    response, _ = get(origin, "/gen/1k/c.bin?no_validators=1")
    assert response.getheader("ETag") is None and response.getheader("Last-Modified") is None


def test_fail_then_succeed_with_retry_after(origin: Origin) -> None:
    path = "/gen/1k/f.bin?fail=503:2&retry_after=7"
    statuses = []
    for _ in range(3):
        response, body = get(origin, path)
        statuses.append(response.status)
        if response.status == 503:
            assert response.getheader("Retry-After") == "7"
    assert statuses == [503, 503, 200] and body == content_bytes("f.bin", 1024)

    response, _ = get(origin, "/gen/1k/f.bin?fail=429:1&retry_after_date=30")
    assert response.status == 429 and response.getheader("Retry-After", "").endswith("GMT")

    origin.reset_stats()  # also resets the per-key failure counters
    assert get(origin, path)[0].status == 503


def test_drop_at_resets_after_exact_byte_count(origin: Origin) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", origin.port, timeout=10)
    conn.request("GET", "/gen/1m/d.bin?drop_at=300000")
    response = conn.getresponse()
    received = read_until_cut(response)
    conn.close()
    assert received == content_bytes("d.bin", 1 << 20, end=300000)
    # drop_times defaults to 1: the retry gets everything
    _, body = get(origin, "/gen/1m/d.bin?drop_at=300000")
    assert len(body) == 1 << 20


def test_short_body_closes_cleanly(origin: Origin) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", origin.port, timeout=10)
    conn.request("GET", "/gen/10k/s.bin?short=1000")
    response = conn.getresponse()
    assert response.getheader("Content-Length") == "10240"
    with pytest.raises(http.client.IncompleteRead) as info:
        response.read()
    assert info.value.partial == content_bytes("s.bin", 10240, end=1000)
    conn.close()


def test_keep_alive_and_pipelining(origin: Origin) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", origin.port, timeout=10)
    for name in ("k1", "k2"):
        conn.request("GET", f"/gen/2k/{name}")
        assert conn.getresponse().read() == content_bytes(name, 2048)
    conn.close()
    assert origin.stats.connections == 1 and origin.stats.hits == 2

    with socket.create_connection(("127.0.0.1", origin.port), timeout=10) as sock:
        sock.sendall(
            b"GET /status/201 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /status/202 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 20") == 2 and data.index(b" 201 ") < data.index(b" 202 ")
    assert origin.stats.connections == 2


def test_framing_variants(origin: Origin) -> None:
    expected = content_bytes("x.bin", 5000)
    response, body = get(origin, "/gen/5000/x.bin?chunked=1")
    assert response.getheader("Transfer-Encoding") == "chunked" and body == expected
    response, body = get(origin, "/gen/5000/x.bin?no_length=1")
    assert response.getheader("Content-Length") is None and response.getheader("Connection") == "close"
    assert body == expected


def test_gzip(origin: Origin) -> None:
    response, body = get(origin, "/gen/20k/z.bin?gzip=force")
    assert response.getheader("Content-Encoding") == "gzip"
    assert response.getheader("Content-Length") == str(len(body))
    assert gzip.decompress(body) == content_bytes("z.bin", 20480)
    response, body = get(origin, "/gen/20k/z.bin?gzip=1", {"Accept-Encoding": "identity"})
    assert response.getheader("Content-Encoding") is None and len(body) == 20480
    response, body = get(origin, "/gen/20k/z.bin?gzip=1", {"Accept-Encoding": "br, gzip;q=0.5"})
    assert response.getheader("Content-Encoding") == "gzip"


def test_redirects_and_other_endpoints(origin: Origin) -> None:
    response, _ = get(origin, "/redirect/2/gen/1k/t.bin?x=1")
    assert response.status == 302 and response.getheader("Location") == "/redirect/1/gen/1k/t.bin?x=1"
    with urllib.request.urlopen(origin.url + "/redirect/2/gen/1k/t.bin?x=1", timeout=10) as final:
        assert final.url == origin.url + "/gen/1k/t.bin?x=1"
        assert final.read() == content_bytes("t.bin", 1024)
    hits = origin.stats.snapshot().hits_by_path
    assert [hits[f"/redirect/{n}/gen/1k/t.bin"] for n in (2, 1, 0)] == [2, 1, 1]

    assert get(origin, "/loop/x")[0].getheader("Location") == "/loop/x"
    assert get(origin, "/loop2/a/x")[0].getheader("Location") == "/loop2/b/x"
    assert get(origin, "/status/418")[0].status == 418
    assert get(origin, "/nothing/here")[0].status == 404
    assert get(origin, "/text/missing")[0].status == 404
    origin.texts["urls.txt"] = "http://a/\nhttp://b/\n"
    response, body = get(origin, "/text/urls.txt")
    assert response.status == 200 and body == b"http://a/\nhttp://b/\n"
    response, body = get(origin, "/disposition/1k/p.bin?filename=../../etc/passwd")
    assert response.getheader("Content-Disposition") == 'attachment; filename="../../etc/passwd"'
    assert body == content_bytes("p.bin", 1024)
    assert get(origin, "/gen/1k/a?drop_at=oops")[0].status == 400


def test_delay_stall_and_inflight(origin: Origin) -> None:
    results: list[int] = []

    def fetch() -> None:
        results.append(len(get(origin, "/gen/1k/slow.bin?delay=0.2")[1]))

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [1024] * 3 and origin.stats.inflight_max == 3 and origin.stats.inflight == 0

    started = time.monotonic()
    _, body = get(origin, "/gen/100k/st.bin?stall_at=1000&stall_for=0.2")
    assert time.monotonic() - started >= 0.2 and body == content_bytes("st.bin", 102400)
    started = time.monotonic()
    get(origin, "/gen/100k/st.bin?stall_at=1000&stall_for=0.2")  # stall_times=1: not again
    assert time.monotonic() - started < 0.2


def test_client_hanging_up_mid_body_is_harmless(origin: Origin, capfd: pytest.CaptureFixture[str]) -> None:
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", origin.port)) as sock:
            sock.sendall(b"GET /gen/64m/h.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.recv(1000)
    deadline = time.monotonic() + 5
    while origin.stats.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert origin.stats.inflight == 0
    assert get(origin, "/gen/10/ok")[0].status == 200
    assert "Traceback" not in capfd.readouterr().err


def test_tls() -> None:
    with Origin(tls=True).start() as o:
        assert o.url.startswith("https://127.0.0.1:") and o.certfile and os.path.exists(o.certfile)
        context = ssl._create_unverified_context()
        with urllib.request.urlopen(o.url + "/gen/100k/s.bin", context=context, timeout=10) as response:
            assert response.read() == content_bytes("s.bin", 102400)
        verified = ssl.create_default_context(cafile=o.certfile)  # the cert also verifies for 127.0.0.1
        with urllib.request.urlopen(o.url + "/status/200", context=verified, timeout=10) as response:
            assert response.status == 200
        certfile = o.certfile
    assert not os.path.exists(certfile)


def test_cli_detach_twice_on_same_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tests.origin", "--port", str(port), "--detach", "--idle-exit", "3"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=20)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"serving on http://127.0.0.1:{port}"
    pid = int(first.stderr.split("pid ")[1].split(";")[0])
    try:
        second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=20)
        assert second.returncode == 0 and "already serving" in second.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/gen/1k/cli.bin", timeout=10) as response:
            assert response.read() == content_bytes("cli.bin", 1024)
    finally:
        os.kill(pid, signal.SIGTERM)


def test_range_size_answers_ranges_for_another_length_with_the_same_validators(origin: Origin) -> None:
    path = "/gen/5000/rs.bin?range_size=9000"
    response, body = get(origin, path)
    etag, date = response.getheader("ETag") or "", response.getheader("Last-Modified")
    assert etag and response.status == 200 and response.getheader("Content-Length") == "5000"
    assert body == content_bytes("rs.bin", 5000)
    response, body = get(origin, path, {"Range": "bytes=1000-", "If-Range": etag})
    assert response.status == 206
    assert response.getheader("Content-Range") == "bytes 1000-8999/9000"
    assert response.getheader("ETag") == etag and response.getheader("Last-Modified") == date
    assert body == content_bytes("rs.bin", 9000)[1000:]
    response, _ = get(origin, path, {"Range": "bytes=9000-"})
    assert response.status == 416 and response.getheader("Content-Range") == "bytes */9000"
    # Without the parameter the same file answers ranges for its own length.
    response, _ = get(origin, "/gen/5000/rs.bin", {"Range": "bytes=1000-", "If-Range": etag})
    assert response.status == 206 and response.getheader("Content-Range") == "bytes 1000-4999/5000"
    response, _ = get(origin, "/gen/5000/rs.bin?range_size=lots")
    assert response.status == 400


def test_hold_pauses_a_body_until_its_gate_opens(origin: Origin) -> None:
    path, size = "/gen/100k/held.bin", 100 * 1024
    got: dict[str, bytes] = {}
    client = threading.Thread(target=lambda: got.setdefault("body", get(origin, f"{path}?hold=g1&hold_at=1000")[1]))
    client.start()
    deadline = time.monotonic() + 10
    while origin.stats.bytes_by_path[path] < 1000 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert origin.stats.bytes_by_path[path] == 1000 and client.is_alive()  # held at the gate
    origin.release("g1")
    client.join(10)
    assert got["body"] == content_bytes("held.bin", size)
    _, body = get(origin, f"{path}?hold=g1&hold_at=1000")  # an open gate stays open
    assert body == content_bytes("held.bin", size)


def test_a_held_body_ends_when_its_client_hangs_up(origin: Origin) -> None:
    with socket.create_connection(("127.0.0.1", origin.port), timeout=10) as sock:
        sock.sendall(b"GET /gen/100k/gone.bin?hold=g2&hold_at=10 HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(4096)
    deadline = time.monotonic() + 10
    while origin.stats.inflight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert origin.stats.inflight == 0 and not origin.gate("g2").is_set()
