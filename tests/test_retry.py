"""The retry policy as a table: each kind of attempt, and what fetcher does next."""

from __future__ import annotations

import pytest
from scrapy.exceptions import (
    DownloadConnectionRefusedError,
    DownloadTimeoutError,
    IgnoreRequest,
    StopDownload,
)
from scrapy.settings import Settings

from fetcher.exceptions import ConnectionRefused, StallTimeoutError
from fetcher.store.writer import FileTooLarge, LengthMismatch, ResumeMismatch
from fetcher.transfer.retry import Action, Attempt, RetryPolicy, Verdict

POLICY = RetryPolicy(times=3, http_codes=frozenset({500, 503, 429}),
                     exceptions=(DownloadConnectionRefusedError, DownloadTimeoutError))


class Odd(Exception):
    reason = "odd"


CASES = [
    # a whole streamed body
    (Attempt(status=200, streamed=True), Verdict(Action.DONE)),
    (Attempt(status=206, streamed=True, resumed=True), Verdict(Action.DONE)),
    # a body whose end could not be told from a reset: ask for what follows
    (Attempt(status=200, streamed=True, unverified_end=True),
     Verdict(Action.CHECK_END, "unverified end", "the body ended with the connection and no length")),
    # 416: the kept part is the whole file, or it is not a prefix of it
    (Attempt(status=416, resumed=True, part_complete=True), Verdict(Action.DONE)),
    (Attempt(status=416, resumed=True),
     Verdict(Action.START_OVER, "bad resume", "the server refused to resume (HTTP 416)", keep_part=False)),
    (Attempt(status=416), Verdict(Action.GIVE_UP, "HTTP 416", "HTTP 416")),
    # statuses: RETRY_HTTP_CODES, and Retry-After carried along
    (Attempt(status=503, retry_after=7.0), Verdict(Action.RETRY, "HTTP 503", "HTTP 503", retry_after=7.0)),
    (Attempt(status=404), Verdict(Action.GIVE_UP, "HTTP 404", "HTTP 404")),
    (Attempt(status=302), Verdict(Action.GIVE_UP, "HTTP 302", "HTTP 302")),  # redirects not followed
    # a 2xx whose body came in memory (another download handler, a middleware): taken as stock takes it
    (Attempt(status=200), Verdict(Action.DONE)),
    # Scrapy's HTTP cache and StopDownload
    (Attempt(status=200, flags=frozenset({"cached"})), Verdict(Action.DONE)),
    (Attempt(status=200, streamed=True, flags=frozenset({"download_stopped"})),
     Verdict(Action.GIVE_UP, "stopped by StopDownload",
             "stopped by StopDownload (a headers_received or bytes_received handler)", keep_part=False)),
    # errors: RETRY_EXCEPTIONS, and the writer's own say whether trying again helps
    (Attempt(error=DownloadConnectionRefusedError("connection refused by h")),
     Verdict(Action.RETRY, "DownloadConnectionRefusedError", "connection refused by h")),
    (Attempt(error=ConnectionRefused("connection refused by h")),  # the handler's: its own reason
     Verdict(Action.RETRY, "connection refused", "connection refused by h")),
    (Attempt(error=StallTimeoutError("no data for 5 s")), Verdict(Action.RETRY, "stall timeout", "no data for 5 s")),
    (Attempt(error=StopDownload(fail=True)),
     Verdict(Action.GIVE_UP, "stopped by StopDownload",
             "stopped by StopDownload (a headers_received or bytes_received handler)", keep_part=False)),
    (Attempt(error=IgnoreRequest("no")), Verdict(Action.GIVE_UP, "filtered", "no")),  # offsite, robots.txt
    (Attempt(error=Odd()), Verdict(Action.GIVE_UP, "odd", "Odd")),
    (Attempt(error=LengthMismatch("got 3 bytes, the server announced 5")),
     Verdict(Action.RETRY, "length mismatch", "got 3 bytes, the server announced 5")),
    (Attempt(error=ResumeMismatch("server resumed at byte 0")),
     Verdict(Action.RETRY, "bad resume", "server resumed at byte 0", keep_part=False)),
    (Attempt(error=FileTooLarge("over")), Verdict(Action.GIVE_UP, "over FETCHER_MAX_SIZE", "over", keep_part=False)),
]


@pytest.mark.parametrize(("attempt", "expected"), CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_classify(attempt: Attempt, expected: Verdict) -> None:
    assert POLICY.classify(attempt) == expected


def test_retry_times_follow_scrapys_settings_and_meta() -> None:
    settings = Settings({"RETRY_TIMES": 4, "RETRY_HTTP_CODES": [503], "RETRY_EXCEPTIONS": [
        "scrapy.exceptions.DownloadTimeoutError"]})
    policy = RetryPolicy.from_settings(settings)
    assert policy.times_for({}) == 4
    assert policy.times_for({"max_retry_times": 1}) == 1
    assert policy.times_for({"dont_retry": True, "max_retry_times": 9}) == 0
    assert RetryPolicy.from_settings(Settings({"RETRY_ENABLED": False})).times_for({}) == 0
    assert policy.classify(Attempt(status=503)).action is Action.RETRY
    assert policy.classify(Attempt(status=500)).action is Action.GIVE_UP
