"""Memory stays flat whatever the file size: a multi-GiB body through a real crawl.

Slow (about a minute): kept out of the default run, run it with ``pytest -m slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import Fetch
from tests.origin import Origin, expected_digest

GiB = 1 << 30
SIZE = int(os.environ.get("FETCHER_TEST_LARGE_SIZE", 2 * GiB + 12345))
RSS_LIMIT_MB = 150

# Runs the crawl as a child and prints its peak RSS (ru_maxrss of the children, in KiB on Linux).
MEASURE = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)
"""


@pytest.mark.slow
def test_large_file_streams_with_flat_memory(fetch: Fetch, origin: Origin) -> None:
    (fetch.cwd / "urls.txt").write_text(f"{origin.url}/gen/{SIZE}/huge.iso  out=huge.iso\n")
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, *fetch.command("-a", "list=urls.txt")],
        cwd=fetch.cwd, env=fetch.env(), capture_output=True, text=True, timeout=900,
    )
    peak_kib, code = (int(x) for x in proc.stdout.split())
    print(f"peak RSS of the crawl: {peak_kib / 1024:.1f} MiB for a {SIZE / GiB:.2f} GiB file")
    assert code == 0, proc.stderr[-3000:]
    path = fetch.cwd / "downloads/huge.iso"
    assert path.stat().st_size == SIZE
    record = json.loads((fetch.cwd / "downloads/manifest.jsonl").read_text())
    assert record["checksum"] == expected_digest("huge.iso", SIZE)  # computed while the bytes arrived
    assert peak_kib / 1024 < RSS_LIMIT_MB
    path.unlink()  # 2 GiB is too much to leave behind in a temp dir
