"""FETCHER_MAX_HEADER_SIZE end to end (hostile input, item 9): real `scrapy crawl fetch` runs
against the test origin's ``header_bytes=`` knob, which streams that many bytes of filler header
lines before the body.

- headers over the cap fail the file at once, with the reason "headers too large", not retried;
  the connection is aborted, so the server never gets to send the body, and the crawl's peak RSS
  does not grow with the headers (64 MiB of them took it from 80 to 169 MiB before the cap);
- headers under the cap (and a line without a colon) download intact;
- a smaller configured cap is the one the error names.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import Fetch, Run, measured
from tests.origin import Origin, expected_digest

MiB = 1 << 20
RSS_LIMIT_BYTES = 200 * 10**6  # 200 MB
RSS_GROWTH_LIMIT_MIB = 32  # over a run of the same file without the filler headers
# A failure "at once" is not a timeout in disguise: the whole crawl (typically 1-2 s) ends long
# before DOWNLOAD_TIMEOUT would have cut the attempt.
SLOW_TIMEOUT = {"DOWNLOAD_TIMEOUT": "60"}
ENDS_WITHIN = 20.0  # seconds for a crawl of a file over the cap


@pytest.fixture(scope="module")
def tls_origin() -> Iterator[Origin]:
    with Origin(tls=True).start() as o:
        yield o


def timed(fetch: Fetch, list_text: str, settings: dict[str, str]) -> tuple[Run, float]:
    """The crawl of *list_text* and how long it took, in seconds."""
    began = time.monotonic()
    run = fetch(list_text, settings=settings)
    return run, time.monotonic() - began


def measured_crawl(fetch: Fetch, list_text: str, settings: dict[str, str] | None = None) -> tuple[Run, float, float]:
    """The crawl of *list_text*, its peak RSS in MiB, and how long it took in seconds."""
    (fetch.cwd / "urls.txt").write_text(list_text)
    began = time.monotonic()
    run, peak = measured(fetch, "-a", "list=urls.txt", settings=settings)
    return run, peak, time.monotonic() - began


def served(origin: Origin, path: str) -> list[dict]:
    """The origin's records of the requests for *path* (a request aborted mid-head is recorded
    when the server notices, a moment after the client hung up)."""
    deadline = time.monotonic() + 10
    while True:
        requests = [r for r in origin.stats.snapshot().requests if r["path"] == path]
        if requests or time.monotonic() > deadline:
            return requests
        time.sleep(0.05)


def assert_given_up_at_once(run: Run, took: float, url: str, message: str) -> None:
    assert run.returncode == 1, run.log[-3000:]
    record = run.record(url)
    assert record["status"] == "failed" and record["attempts"] == 1, record
    assert record["error"] == message, record
    assert took < ENDS_WITHIN, (took, run.log[-3000:])
    assert "headers too large" in run.log, run.log[-3000:]  # the summary's reason
    assert "Traceback" not in run.log, run.log[-3000:]


def test_headers_over_the_cap_fail_at_once_and_are_not_retried(fetch: Fetch, origin: Origin) -> None:
    path = "/gen/64k/huge-head.bin"
    url = f"{origin.url}{path}?header_bytes=1m"
    run, took = timed(fetch, f"{url}\n", {"RETRY_TIMES": "3", **SLOW_TIMEOUT})
    assert_given_up_at_once(run, took, url, "response headers over 256 KiB (FETCHER_MAX_HEADER_SIZE)")
    assert origin.stats.snapshot().hits_by_path[path] == 1  # not retried


def test_64_mib_of_headers_cost_no_memory(fetch: Fetch, origin: Origin) -> None:
    """The headers are neither kept nor read past the cap: the server is cut off long before the
    body (64 MiB do not fit in the socket buffers), and the peak RSS is that of a plain run."""
    plain, plain_peak, _ = measured_crawl(fetch, f"{origin.url}/gen/64k/plain-head.bin\n")
    assert plain.returncode == 0, plain.log[-3000:]
    path = "/gen/64k/huge-head.bin"
    url = f"{origin.url}{path}?header_bytes=64m"
    run, peak, took = measured_crawl(fetch, f"{url}\n", settings=SLOW_TIMEOUT)
    print(f"peak RSS with 64 MiB of response headers: {peak:.1f} MiB (a plain run: {plain_peak:.1f} MiB)")
    assert_given_up_at_once(run, took, url, "response headers over 256 KiB (FETCHER_MAX_HEADER_SIZE)")
    assert peak * 1024 * 1024 < RSS_LIMIT_BYTES
    assert peak - plain_peak < RSS_GROWTH_LIMIT_MIB, (peak, plain_peak)
    [request] = served(origin, path)
    assert request["body_bytes"] == 0, request  # aborted mid-head: no more was read


def test_headers_over_the_cap_through_tls_abort_the_connection(fetch: Fetch, tls_origin: Origin) -> None:
    tls_origin.reset_stats()
    path = "/gen/64k/tls-head.bin"
    url = f"{tls_origin.url}{path}?header_bytes=64m"
    run, took = timed(fetch, f"{url}\n", {"DOWNLOAD_VERIFY_CERTIFICATES": "False", **SLOW_TIMEOUT})
    assert_given_up_at_once(run, took, url, "response headers over 256 KiB (FETCHER_MAX_HEADER_SIZE)")
    [request] = served(tls_origin, path)
    assert request["body_bytes"] == 0, request


def test_headers_under_the_cap_download_intact(fetch: Fetch, origin: Origin) -> None:
    """100 KiB of headers, one line of them without a colon (skipped, as stock does)."""
    url = f"{origin.url}/gen/300k/roomy-head.bin?header_bytes=100k&colonless_header=1"
    run = fetch(f"{url}\n")
    assert run.returncode == 0, run.log[-3000:]
    record = run.record(url)
    assert record["status"] == "downloaded" and record["attempts"] == 1, record
    assert record["checksum"] == expected_digest("roomy-head.bin", 300 * 1024)


def test_the_configured_cap_is_the_one_named(fetch: Fetch, origin: Origin) -> None:
    over = f"{origin.url}/gen/2k/over-8k.bin?header_bytes=10k"
    under = f"{origin.url}/gen/2k/under-8k.bin?header_bytes=6k"
    run, took = timed(fetch, f"{over}\n{under}\n", {"FETCHER_MAX_HEADER_SIZE": "8192", **SLOW_TIMEOUT})
    assert_given_up_at_once(run, took, over, "response headers over 8 KiB (FETCHER_MAX_HEADER_SIZE)")
    record = run.record(under)
    assert record["status"] == "downloaded" and record["checksum"] == expected_digest("under-8k.bin", 2048)
