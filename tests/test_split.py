"""Segmented downloads (aria2's split=): several ranges of one file at once, each
resumable, the digest the whole file's."""

from __future__ import annotations

import re

from tests.conftest import Fetch
from tests.origin import Origin, content_bytes, expected_digest

MiB = 1024 * 1024


def range_gets(origin: Origin, path: str) -> list[tuple[int, int]]:
    """The (first, last) byte of each GET with a Range for *path*, as the origin saw them."""
    found = []
    for r in origin.stats.snapshot().requests:
        headers = {k.lower(): v for k, v in r["headers"].items()}
        if r["path"] == path and r["method"] == "GET" and (m := re.fullmatch(r"bytes=(\d+)-(\d+)",
                                                                              headers.get("range", ""))):
            found.append((int(m.group(1)), int(m.group(2))))
    return sorted(found)


def test_split_fetches_ranges_at_once_and_checks_the_whole_file(fetch: Fetch, origin: Origin) -> None:
    origin.reset_stats()
    url = f"{origin.url}/gen/8m/split8.bin?rate={2 * MiB}"  # 2 MiB/s per connection
    run = fetch(f"{url}\n  split=8\n", settings={"FETCHER_MIN_SPLIT_SIZE": MiB})
    assert run.returncode == 0, run.log[-3000:]
    record = run.record(url)
    assert record["status"] == "downloaded" and record["checksum"] == expected_digest("split8.bin", 8 * MiB)
    assert (run.store / record["path"]).read_bytes() == content_bytes("split8.bin", 8 * MiB)
    assert range_gets(origin, "/gen/8m/split8.bin") == [(i * MiB, (i + 1) * MiB - 1) for i in range(8)]
    assert origin.stats.inflight_max >= 4  # the ranges ran side by side, not one after another
    assert not list(run.store.rglob("*.part*"))


def test_a_dropped_segment_resumes_where_it_stopped(fetch: Fetch, origin: Origin) -> None:
    origin.reset_stats()
    url = f"{origin.url}/gen/4m/split-drop.bin?drop_at=300000"  # one segment's connection is cut once
    run = fetch(url + "\n", settings={"FETCHER_SPLIT": 4, "FETCHER_MIN_SPLIT_SIZE": MiB,
                                      "FETCHER_BACKOFF_BASE": 0.05})
    assert run.returncode == 0, run.log[-3000:]
    assert run.record(url)["checksum"] == expected_digest("split-drop.bin", 4 * MiB)
    gets = range_gets(origin, "/gen/4m/split-drop.bin")
    starts = [first for first, _ in gets]
    assert len(gets) == 5 and any(first % MiB == 300000 for first in starts)  # resumed, not refetched
    assert origin.stats.bytes_by_path["/gen/4m/split-drop.bin"] == 4 * MiB  # no byte sent twice


def test_small_files_and_servers_without_ranges_are_one_stream(fetch: Fetch, origin: Origin) -> None:
    origin.reset_stats()
    small = f"{origin.url}/gen/1m/split-small.bin"
    no_ranges = f"{origin.url}/gen/4m/split-noranges.bin?no_range=1"
    run = fetch(f"{small}\n{no_ranges}\n", settings={"FETCHER_SPLIT": 8, "FETCHER_MIN_SPLIT_SIZE": MiB})
    assert run.returncode == 0, run.log[-3000:]
    assert not range_gets(origin, "/gen/1m/split-small.bin")
    assert not range_gets(origin, "/gen/4m/split-noranges.bin")
    stored = run.store / run.record(no_ranges)["path"]
    assert stored.read_bytes() == content_bytes("split-noranges.bin", 4 * MiB)
