"""Preallocated bodies (FETCHER_FILE_ALLOCATION) through real crawls: a kill -9 resumes from the
offset saved in .part.meta (a preallocated .part is full-size from the start), a disk too small
fails the file before a byte is written, and an old .part without a saved offset still resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.conftest import Fetch
from tests.origin import Origin, content_bytes, expected_digest
from tests.test_faults import _manifest, assert_no_traceback, requests_for, small_disk  # noqa: F401 (a fixture)

MiB = 1 << 20


def _saved_offset(meta: Path) -> int | None:
    try:
        return json.loads(meta.read_text()).get("offset")
    except (OSError, ValueError):
        return None


def test_preallocated_part_resumes_after_kill_9(fetch: Fetch, origin: Origin) -> None:
    size, path = 8 * MiB, "/gen/8m/prealloc.bin"
    url = f"{origin.url}{path}?rate=1000000"
    (fetch.cwd / "urls.txt").write_text(f"{url}  out=prealloc.bin\n")
    proc = subprocess.Popen(fetch.command("-a", "list=urls.txt"), cwd=fetch.cwd, env=fetch.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part, meta = fetch.cwd / "downloads/prealloc.bin.part", fetch.cwd / "downloads/prealloc.bin.part.meta"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (_saved_offset(meta) or 0) < 2 * MiB:
        time.sleep(0.05)
    assert part.stat().st_size == size  # preallocated: its size says nothing of what was written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = _saved_offset(meta)
    assert saved is not None and 2 * MiB <= saved < size
    assert part.read_bytes()[:saved] == content_bytes("prealloc.bin", size, end=saved)

    run = fetch(None, "-a", "list=urls.txt")
    assert run.returncode == 0, run.log
    resumed = [r for r in requests_for(origin, path) if r["status"] == 206]
    assert resumed and resumed[0]["headers"]["range"] == f"bytes={saved}-"
    assert run.record(url)["checksum"] == expected_digest("prealloc.bin", size)
    assert (fetch.cwd / "downloads/prealloc.bin").stat().st_size == size
    assert not part.exists() and not meta.exists()
    assert origin.stats.bytes_by_path[path] < size + MiB  # the kill -9 test's allowance


def test_disk_that_cannot_hold_a_preallocated_file_fails_it_at_once(
        fetch: Fetch, origin: Origin, small_disk: Path) -> None:  # noqa: F811 (the fixture imported above)
    path = "/gen/8m/toobig.bin"
    run = fetch(f"{origin.url}{path}  out=toobig.bin\n",
                settings={"FILES_STORE": str(small_disk), "RETRY_TIMES": 3})
    assert run.returncode == 1
    assert_no_traceback(run)
    (record,) = _manifest(small_disk)
    assert "the disk cannot hold 8.0 MiB (No space left on device)" in record["error"], record
    assert len(requests_for(origin, path)) == 1  # not retried
    assert not (small_disk / "toobig.bin.part").exists() and not (small_disk / "toobig.bin").exists()


def test_old_part_without_a_saved_offset_resumes_from_its_size(fetch: Fetch, origin: Origin) -> None:
    size, path, kept = 8 * MiB, "/gen/8m/old.bin", 3 * MiB + 123
    url = f"{origin.url}{path}"
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as head:
        etag, last_modified = head.headers["ETag"], head.headers["Last-Modified"]
    store = fetch.cwd / "downloads"
    store.mkdir()
    (store / "old.bin.part").write_bytes(content_bytes("old.bin", size, end=kept))
    (store / "old.bin.part.meta").write_text(json.dumps(
        {"url": url, "etag": etag, "last_modified": last_modified, "length": size}))
    run = fetch(f"{url}  out=old.bin\n")
    assert run.returncode == 0, run.log
    ranged = [r for r in requests_for(origin, path) if r["status"] == 206]
    assert ranged and ranged[0]["headers"]["range"] == f"bytes={kept}-"
    assert run.record(url)["checksum"] == expected_digest("old.bin", size)
