"""Every ``FETCHER_*`` setting: its default, and one validated, typed view of them.

:data:`DEFAULTS` is the only place a default is written; the add-on sets them
at add-on priority (so a project's settings, a spider's ``custom_settings`` and
``-s`` win), and :class:`Config` reads the crawler's settings against them.
:meth:`Config.of` builds the config once per crawler; every component takes it
from there, so a bad value fails one way, before any download: a
:class:`~fetcher.exceptions.StartupError` ("Cannot start: …", exit status 1 with
fetcher's commands).
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from fetcher.exceptions import StartupError
from fetcher.store.writer import ALLOCATIONS
from fetcher.transfer.backoff import Backoff
from fetcher.transfer.ratelimit import parse_rate
from fetcher.workers.plan import parse_workers

if TYPE_CHECKING:
    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings

#: Every FETCHER_* setting and its default.
DEFAULTS: dict[str, Any] = {
    # -- Where files go and how they are named
    "FETCHER_LAYOUT": "hash",  # "hash": stock's full/<sha1>.<ext>; "url": <host>[:port]/<url path>[?query]
    "FETCHER_ALGORITHM": "md5",  # hashlib name of the digest in the records and in `files` (stock: md5)
    "FETCHER_NAME_QUERY": True,  # "url" layout: keep a URL's query string in its file name
    "FETCHER_EMPTY_FILES": False,  # keep a 0-byte body as a file (stock refuses it: "empty-content")
    # -- The store's records (one current record per URL, across runs), in an SQLite index
    "FETCHER_STATE_DIR": "",  # "": <FILES_STORE>/.fetcher, or for a remote store ~/.local/state/fetcher/<store>
    "FETCHER_MANIFEST": "",  # one JSON line per URL; "": manifest.jsonl in FILES_STORE (remote: in the state folder)
    "FETCHER_FAILED_LIST": "",  # the store's failures in list format; "": failed.txt beside the manifest
    "FETCHER_VERIFY": "stat",  # finished files: "stat" compares size and mtime with the record; "full" re-hashes
    # -- Remote stores (s3://, gs://, ftp://)
    "FETCHER_SPOOL": "",  # where bodies are written before upload; "": spool/ in the (private) state folder
    "FETCHER_MULTIPART_THRESHOLD": 8 * 1024 * 1024,  # larger files are uploaded in parts of this size
    # -- Transfers
    "FETCHER_MAX_SIZE": 0,  # bytes; a larger file fails (0: no cap; meta download_maxsize per request)
    "FETCHER_RESUME": True,  # continue a .part file with Range/If-Range instead of starting over
    "FETCHER_REVALIDATE": False,  # ask the server (If-None-Match/If-Modified-Since) about finished files
    "FETCHER_FSYNC": False,  # fsync each file before renaming it into place
    "FETCHER_FILE_ALLOCATION": "falloc",  # aria2's --file-allocation for bodies of 5 MiB or more: none, prealloc, trunc, falloc
    "FETCHER_STALL_TIMEOUT": None,  # seconds without body bytes before an attempt is abandoned; None: DOWNLOAD_TIMEOUT
    "FETCHER_MAX_TIME": 0,  # seconds one attempt may take in all (0: no limit)
    "FETCHER_MAX_HEADER_SIZE": 256 * 1024,  # bytes of response headers; more fails the attempt, not retried
    "FETCHER_MAX_RATE": 0,  # bytes/s (or "512K", "2M") for all transfers together (0: no cap); wget's --limit-rate
    "FETCHER_MAX_RATE_PER_HOST": 0,  # bytes/s for each host (downloader slot) across its transfers (0: no cap)
    "FETCHER_SPLIT": 1,  # ranges fetched at once per file (aria2's split=; a list entry's split= wins)
    "FETCHER_MIN_SPLIT_SIZE": 20 * 1024 * 1024,  # no range shorter than this (aria2's -k): smaller files, one
    # -- Retries (RETRY_TIMES, RETRY_HTTP_CODES, RETRY_EXCEPTIONS say which and how often)
    "FETCHER_BACKOFF_BASE": 1.0,  # first retry waits about this long (seconds), doubling each time
    "FETCHER_BACKOFF_MAX": 60.0,  # cap on the exponential backoff (seconds)
    "FETCHER_RETRY_AFTER_MAX": 600.0,  # cap on a server's Retry-After (seconds)
    # -- The fetch spider and what a person sees
    "FETCHER_MAX_PENDING": 1000,  # list entries in progress at once, at least 2 x CONCURRENT_REQUESTS
    "FETCHER_MAX_LINE": 64 * 1024,  # characters in one list line (or queue entry line); longer: a bad line
    "FETCHER_MAX_OPTIONS": 1000,  # options of one list entry; more: a bad entry
    "FETCHER_PROGRESS": "auto",  # "bar" on a terminal, "log" lines otherwise; or "bar", "log", "off"
    "FETCHER_PROGRESS_INTERVAL": 60.0,  # seconds between progress log lines (the "log" mode)
    "FETCHER_INVOKED_AS": "",  # set by the `fetcher` console command, so messages show its rerun command
    # -- A shared queue (scrapy enqueue REDIS_URL LIST; scrapy crawl fetch -a list=REDIS_URL)
    "FETCHER_QUEUE_LEASE": 60.0,  # seconds an entry stays a dead worker's before another takes it
    "FETCHER_QUEUE_IDLE": 10.0,  # a worker ends after this long with nothing waiting or in flight; 0: never
    "FETCHER_QUEUE_MAX_DELIVERIES": 5,  # an entry delivered this often without an ack is dead-lettered
    # -- Worker processes (fetcher.workers): one list, one store, one report
    "FETCHER_WORKERS": "auto",  # processes downloading a list: N, or "auto" (one per core for a long list; README)
    "FETCHER_WORKER_CHANNEL": "",  # set by a run for its workers ("FD:PID:RUN"): not a setting to set by hand
    "FETCHER_SHARED_LIMITS": "",  # set by a run for its workers: the folder of the bandwidth caps they share
}

_LAYOUTS = ("url", "hash")
_VERIFY_MODES = ("stat", "full")
_PROGRESS_MODES = ("auto", "bar", "log", "off")
_OFF = ("false", "0", "none")  # also taken for "off"


@dataclass(frozen=True, slots=True)
class Config:
    """The crawl's FETCHER_* settings, checked and typed (RETRY_* are Scrapy's: fetcher.transfer.retry reads them)."""

    layout: str
    algorithm: str
    name_query: bool
    empty_files: bool
    state_dir: str
    manifest: str
    failed_list: str
    verify: str
    spool: str
    multipart_threshold: int
    max_size: int
    resume: bool
    revalidate: bool
    fsync: bool
    file_allocation: str
    stall_timeout: float  # resolved: DOWNLOAD_TIMEOUT when unset
    max_time: float
    max_header_size: int
    max_rate: float
    max_rate_per_host: float
    split: int
    min_split_size: int
    max_pending: int  # resolved: at least twice CONCURRENT_REQUESTS
    max_line: int
    max_options: int
    progress: str
    progress_interval: float
    invoked_as: str
    queue_lease: float
    queue_idle: float
    queue_max_deliveries: int
    workers: int | None  # None: auto
    worker_channel: WorkerChannel | None  # in a worker process: how it reports to its run
    shared_limits: str
    backoff: Backoff

    @classmethod
    def of(cls, crawler: Crawler) -> Config:
        """The crawler's config, built and checked on first use (StartupError when a value is bad)."""
        config = _BY_CRAWLER.get(crawler)
        if config is None:
            config = _BY_CRAWLER[crawler] = cls.from_settings(crawler.settings)
        return config

    @classmethod
    def from_settings(cls, settings: BaseSettings) -> Config:
        try:
            return cls._read(_Reader(settings))
        except ValueError as exc:
            raise StartupError(str(exc)) from None

    @classmethod
    def _read(cls, r: _Reader) -> Config:
        stall = r.raw("FETCHER_STALL_TIMEOUT")
        return cls(
            layout=r.choice("FETCHER_LAYOUT", _LAYOUTS),
            algorithm=r.algorithm("FETCHER_ALGORITHM"),
            name_query=r.bool("FETCHER_NAME_QUERY"),
            empty_files=r.bool("FETCHER_EMPTY_FILES"),
            state_dir=r.text("FETCHER_STATE_DIR"),
            manifest=r.text("FETCHER_MANIFEST"),
            failed_list=r.text("FETCHER_FAILED_LIST"),
            verify=r.choice("FETCHER_VERIFY", _VERIFY_MODES),
            spool=r.text("FETCHER_SPOOL"),
            multipart_threshold=r.int("FETCHER_MULTIPART_THRESHOLD", minimum=1),
            max_size=r.int("FETCHER_MAX_SIZE"),
            resume=r.bool("FETCHER_RESUME"),
            revalidate=r.bool("FETCHER_REVALIDATE"),
            fsync=r.bool("FETCHER_FSYNC"),
            file_allocation=r.choice("FETCHER_FILE_ALLOCATION", ALLOCATIONS),
            stall_timeout=r.settings.getfloat("DOWNLOAD_TIMEOUT") if stall in (None, "")
            else r.seconds("FETCHER_STALL_TIMEOUT"),
            max_time=r.seconds("FETCHER_MAX_TIME"),
            max_header_size=r.int("FETCHER_MAX_HEADER_SIZE", minimum=1024),
            max_rate=parse_rate("FETCHER_MAX_RATE", r.raw("FETCHER_MAX_RATE")),
            max_rate_per_host=parse_rate("FETCHER_MAX_RATE_PER_HOST", r.raw("FETCHER_MAX_RATE_PER_HOST")),
            split=r.int("FETCHER_SPLIT", minimum=1),
            min_split_size=r.int("FETCHER_MIN_SPLIT_SIZE", minimum=1),
            # Never fewer than twice the transfers that may run at once, or the list would starve them.
            max_pending=max(r.int("FETCHER_MAX_PENDING", minimum=1), 2 * r.settings.getint("CONCURRENT_REQUESTS")),
            max_line=r.int("FETCHER_MAX_LINE", minimum=1),
            max_options=r.int("FETCHER_MAX_OPTIONS", minimum=1),
            progress="off" if str(r.raw("FETCHER_PROGRESS")).lower() in _OFF
            else r.choice("FETCHER_PROGRESS", _PROGRESS_MODES),
            progress_interval=r.seconds("FETCHER_PROGRESS_INTERVAL", positive=True),
            invoked_as=r.text("FETCHER_INVOKED_AS"),
            queue_lease=r.seconds("FETCHER_QUEUE_LEASE", positive=True),
            queue_idle=r.seconds("FETCHER_QUEUE_IDLE"),
            queue_max_deliveries=r.int("FETCHER_QUEUE_MAX_DELIVERIES", minimum=1),
            workers=parse_workers(r.raw("FETCHER_WORKERS")),
            worker_channel=_channel(r.text("FETCHER_WORKER_CHANNEL")),
            shared_limits=r.text("FETCHER_SHARED_LIMITS"),
            backoff=Backoff(r.seconds("FETCHER_BACKOFF_BASE"), r.seconds("FETCHER_BACKOFF_MAX"),
                            r.seconds("FETCHER_RETRY_AFTER_MAX")),
        )


class WorkerChannel(NamedTuple):
    """FETCHER_WORKER_CHANNEL ("FD:PID:RUN"): what a worker process knows of its run."""

    fd: int  # the pipe its reports go to
    run_pid: int  # the run's process
    run_id: str  # the run's id, in every record a worker writes

    def __str__(self) -> str:
        return f"{self.fd}:{self.run_pid}:{self.run_id}"


def _channel(value: str) -> WorkerChannel | None:
    if not value:
        return None
    fd, pid, run = (value.split(":", 2) + ["", ""])[:3]
    try:
        return WorkerChannel(int(fd), int(pid), run)
    except ValueError:
        raise ValueError(f"FETCHER_WORKER_CHANNEL is set by a run for its workers, not {value!r}") from None


_BY_CRAWLER: weakref.WeakKeyDictionary[Crawler, Config] = weakref.WeakKeyDictionary()


class _Reader:
    """Reads one setting at a time against DEFAULTS, with one ValueError wording for a bad value."""

    def __init__(self, settings: BaseSettings) -> None:
        self.settings = settings

    def raw(self, name: str) -> Any:
        return self.settings.get(name, DEFAULTS[name])

    def text(self, name: str) -> str:
        value = self.raw(name)
        return "" if value is None else str(value)

    def bool(self, name: str) -> bool:
        try:
            return self.settings.getbool(name, DEFAULTS[name])
        except ValueError:
            raise ValueError(f"{name} must be True or False, not {self.raw(name)!r}") from None

    def int(self, name: str, *, minimum: int = 0) -> int:
        value = self.raw(name)
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = minimum - 1
        if isinstance(value, bool) or number < minimum:
            raise ValueError(f"{name} must be a whole number of at least {minimum}, not {value!r}")
        return number

    def seconds(self, name: str, *, positive: bool = False) -> float:
        value = self.raw(name)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = -1.0
        if isinstance(value, bool) or not (number > 0 if positive else number >= 0) or number == float("inf"):
            least = "more than 0" if positive else "0 or more"
            raise ValueError(f"{name} must be a number of seconds ({least}), not {value!r}")
        return number

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        value = str(self.raw(name)).lower()
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, not {self.raw(name)!r}")
        return value

    def algorithm(self, name: str) -> str:
        value = str(self.raw(name))
        try:
            hashlib.new(value)  # an unknown name fails at start, not per file
        except ValueError:
            raise ValueError(f"{name}={value!r} is not a hashlib algorithm") from None
        return value
