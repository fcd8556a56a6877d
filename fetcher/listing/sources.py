"""Where a URL list comes from: a file (plain or gzip), ``-`` (standard input), an
http(s) URL, or ``package:NAME`` (a list shipped in fetcher/lists/). Shared by the
fetch spider and ``scrapy enqueue``, so both read a list the same way.

A list URL is downloaded to a temporary file first (a huge one is then read
lazily like a file), retried through fetcher's one retry helper; how the bytes
are fetched is the caller's (the spider through Scrapy's engine, ``scrapy
enqueue`` with the standard library). Lists are parsed in a thread, and their
entries cross to the event loop in batches (:func:`in_thread`), so neither a slow
source nor a fast one holds up the downloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import pkgutil
import queue
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from fetcher.listing.urllist import (
    BadLine,
    Entry,
    ListWarning,
    open_list,
    parse_lines,
    text_lines,
)
from fetcher.redact import safe_url
from fetcher.store.naming import safe_relpath
from fetcher.transfer.retry import AttemptFailed, Retrier

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
PACKAGED = "package:"  # -a list=package:NAME: fetcher/lists/NAME, shipped in the package (or egg)
_BATCH = 256  # list entries handed over from the list-reading thread at a time
_WARNED_NAMES = 20  # kinds of list warning said before the rest are only counted

#: Fetches a list URL into a file; raises (with a readable message) when it cannot.
Fetch = Callable[[str, Path], Awaitable[None]]


class ListUnavailable(Exception):
    """The list itself cannot be read: nothing can be done."""


class ListFetchFailed(Exception):
    """One attempt to fetch a list URL failed; ``retryable`` says whether another may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def check_source(source: str) -> None:
    """Refuse a list that cannot be read before anything starts (ValueError)."""
    if source.startswith(PACKAGED):
        packaged_list(source)
    elif source != "-" and not is_url(source):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"list file {source} does not exist or is not a file")
        try:
            path.open("rb").close()
        except OSError as exc:
            raise ValueError(f"list file {source} cannot be read: {exc.strerror}") from exc


def packaged_list(source: str) -> bytes:
    """A list shipped as package data in ``fetcher/lists/`` (read with pkgutil, so it
    works from an installed package or a Scrapyd egg alike). ValueError when absent."""
    name = source.removeprefix(PACKAGED)
    try:
        data = pkgutil.get_data("fetcher", f"lists/{safe_relpath(name)}")
    except (OSError, ValueError) as exc:
        raise ValueError(f"no list {name!r} is packaged in fetcher/lists/") from exc
    if data is None:
        raise ValueError(f"no list {name!r} is packaged in fetcher/lists/")
    return data


@contextlib.asynccontextmanager
async def local_copy(source: str, fetch: Fetch, retrier: Retrier) -> AsyncIterator[Path | None]:
    """The list as a file to read: the file itself, or a temporary copy of a list URL or
    a packaged list (removed afterwards); None for standard input (read as it arrives)."""
    if source == "-":
        yield None
    elif is_url(source) or source.startswith(PACKAGED):
        with tempfile.TemporaryDirectory(prefix="fetcher-list-") as tmp:
            path = Path(tmp) / "list"
            if is_url(source):
                await download(source, path, fetch, retrier)
            else:
                path.write_bytes(packaged_list(source))
            yield path
    else:
        yield Path(source)


async def download(url: str, dest: Path, fetch: Fetch, retrier: Retrier) -> None:
    """Fetch a list URL into *dest*, retried as every transfer is (RETRY_TIMES, the backoff)."""
    retries = 0
    while True:
        try:
            await fetch(url, dest)
            return
        except ListFetchFailed as exc:
            failed = AttemptFailed(str(exc), reason="list download", retryable=exc.retryable)
            if not await retrier.again(failed, retries, retrier.times, f"the list {safe_url(url)}"):
                raise ListUnavailable(f"cannot fetch the list {safe_url(url)}: {exc}") from None
            retries += 1


def entries_of(path: Path | None, *, max_line: int, max_options: int) -> Iterator[Entry | BadLine]:
    """The entries of a list file, or of standard input when *path* is None (UTF-8
    whatever the locale, undecodable bytes replaced, as in a list file). A line over
    *max_line* characters, or an entry of over *max_options* options, is a bad line."""
    if path is None:
        yield from parse_lines(text_lines(sys.stdin.buffer, max_line=max_line), max_line=max_line,
                               max_options=max_options)
        return
    try:
        with open_list(path, max_line=max_line) as f:
            yield from parse_lines(f, max_line=max_line, max_options=max_options)
    except OSError as exc:  # unreadable, or a damaged gzip
        raise ListUnavailable(f"cannot read the list {path}: {exc.strerror or exc}") from exc


def count_entries(path: Path, *, max_line: int) -> int:
    """How many URL lines a list file has (for a progress total), without parsing it."""
    with open_list(path, max_line=max_line) as f:
        return sum(1 for line in f if line.strip() and not line.startswith((" ", "\t", "#", "\ufeff#")))


async def read_entries(path: Path | None, *, max_line: int, max_options: int) -> AsyncIterator[Entry | BadLine]:
    """:func:`entries_of` from a thread: a file in batches, standard input line by line
    (a pipe still being written: no line waits for the next)."""
    entries = functools.partial(entries_of, path, max_line=max_line, max_options=max_options)
    async for entry in in_thread(entries, batch=1 if path is None else _BATCH):
        yield entry


class ListWarnings:
    """Each kind of list warning said once per run, and past a few kinds only counted,
    so that neither a million lines with one unknown option nor a thousand different
    option names flood the log."""

    def __init__(self, limit: int = _WARNED_NAMES) -> None:
        self.limit = limit
        self._said: set[str] = set()
        self.unsaid = 0  # warnings of kinds past the limit

    def say(self, warnings: Iterable[ListWarning]) -> None:
        for w in warnings:
            if w.option in self._said:
                continue
            if len(self._said) >= self.limit:
                self.unsaid += 1
                continue
            self._said.add(w.option)
            logger.warning("%s: %s (said once per run)", w.where, w.message)

    def close(self) -> None:
        if self.unsaid:
            logger.warning("%d more list warnings of other kinds were not shown (the first %d kinds were)",
                           self.unsaid, self.limit)


_END = object()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def in_thread(produce: Callable[[], Iterable[_T]], maxsize: int = 1024, batch: int = 1) -> AsyncIterator[_T]:
    """Iterate a blocking iterable in a thread, through a bounded queue. Items cross in
    lists of *batch* (a file: many at a time, each hand-over costs locks and a thread
    switch; a pipe: 1, so that no line waits for the next)."""
    loop = asyncio.get_running_loop()
    chunks: queue.Queue[list[Any]] = queue.Queue(max(1, maxsize // batch))
    ready = asyncio.Event()
    waiting = False

    def put(chunk: list[Any]) -> None:
        chunks.put(chunk)
        if waiting:  # wake the consumer only when it sleeps: one wake-up per batch
            loop.call_soon_threadsafe(ready.set)

    def run() -> None:
        chunk: list[Any] = []
        try:
            for item in produce():
                chunk.append(item)
                if len(chunk) >= batch:
                    put(chunk)
                    chunk = []
        except BaseException as exc:  # noqa: BLE001 - handed over to the consumer
            chunk.append(_Raised(exc))
        chunk.append(_END)
        put(chunk)

    threading.Thread(target=run, name="fetcher-list", daemon=True).start()
    while True:
        try:
            chunk = chunks.get_nowait()
        except queue.Empty:
            ready.clear()
            waiting = True
            if chunks.empty():
                await ready.wait()
            waiting = False
            continue
        for item in chunk:
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
