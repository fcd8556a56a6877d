"""What flows through fetcher: the item the spider emits and the record of one URL."""

from __future__ import annotations

import hashlib
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal
from urllib.parse import urldefrag

from fetcher.listing.urllist import Entry
from fetcher.redact import host_of, safe_url

Status = Literal["downloaded", "cached", "uptodate", "failed"]
BAD_LINE = "bad list line"  # the failure reason of a line that is not a valid entry


def run_key(text: str) -> int:
    """An 8-byte hash of a URL or a path: what run-wide sets keep instead of the
    text, so that checking millions of entries stays small."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def url_key(url: str) -> int:
    """:func:`run_key` of a URL as a run tells URLs apart: ``x.bin#frag`` is ``x.bin``
    (fragments never reach a server)."""
    return run_key(urldefrag(url)[0])


@dataclass
class FetchItem:
    """One download of the fetch spider: the stock ``file_urls``/``files`` fields,
    then, once its URL ended, the URL's record, flat, with the fields of its
    manifest line (``url``, ``status``, ``path`` ...). A feed export of the fetch
    spider's items (``-O records.jsonl``, Scrapyd's ``items_url``) is its records:
    the fetch project's FEED_EXPORT_FIELDS are the manifest's fields.

    ``fetcher_entries`` (the list entries, with ``out=``, checksum, headers) is
    what the pipeline needs for each URL; it is no field, so it is never exported."""

    file_urls: list[str]
    fetcher_entries: InitVar[list[Entry] | None] = None
    files: list[dict[str, Any]] = field(default_factory=list)
    url: str | None = None
    status: str | None = None
    path: str | None = None
    size: int | None = None
    checksum: str | None = None
    algorithm: str | None = None
    http_status: int | None = None
    attempts: int | None = None
    error: str | None = None
    note: str | None = None
    mirror: str | None = None
    run: str | None = None
    finished_at: str | None = None

    def __post_init__(self, fetcher_entries: list[Entry] | None) -> None:
        self.fetcher_entries = fetcher_entries or []

    def set_record(self, line: dict[str, Any]) -> None:
        """Take the URL's record (its manifest line) as the item's own fields."""
        for name, value in line.items():
            setattr(self, name, value)

    def __repr__(self) -> str:
        """What Scrapy logs for a scraped item: no credentials (URLs, header= values)."""
        return f"FetchItem(file_urls={[safe_url(u) for u in self.file_urls]!r}, status={self.status!r})"


@dataclass(slots=True)
class FileRecord:
    """How one URL ended: a manifest line, a summary count, maybe a failed.txt line."""

    entry: Entry
    status: Status
    path: str | None = None
    size: int | None = None
    checksum: str | None = None
    algorithm: str | None = None
    http_status: int | None = None
    attempts: int = 0
    error: str | None = None
    reason: str | None = None  # short failure category for the summary: "HTTP 404", "stall timeout"
    received: int = 0  # bytes that came over the network in this run
    elapsed: float = 0.0  # seconds from the first attempt to the end
    note: str | None = None  # why a file on disk was fetched again, or how one was found good
    mirror: str | None = None  # the mirror that served the file, when not the entry's first URL
    mtime_ns: int | None = None  # of the finished file, for the store's records
    etag: str | None = None
    last_modified: str | None = None
    fetched_at: str | None = None  # when the bytes of an up-to-date file came from the server
    finished_at: str | None = None  # when it ended (UTC, ISO 8601), set when its record is made
    response: Any = field(default=None, repr=False)  # the Response that brought the file, for file_stored
    line: dict[str, Any] | None = field(default=None, repr=False)  # its manifest line, once recorded (made once)

    @property
    def url(self) -> str:
        return self.entry.url

    @property
    def host(self) -> str:
        """host[:port], never the user:password a URL may carry."""
        return host_of(self.entry.url)

    def files_entry(self, url: str | None = None) -> dict[str, Any]:
        """Stock FilesPipeline's entry in an item's ``files`` for this file (its request's
        *url*, when a subclass's request had another)."""
        return {"url": url or self.url, "path": self.path or "", "checksum": self.checksum, "status": self.status}
