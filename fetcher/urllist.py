"""The URL list format: one URL per line, options after it or on indented
lines below it, as in aria2c input files (so an aria2c list works unchanged)::

    # comments and blank lines are ignored
    https://host/a/file.iso
    https://host/b.iso   out=isos/b.iso   sha256=<64 hex>
    https://host/c.iso
      out=c.iso
      checksum=sha-256=<64 hex>

Parsing is lazy and line-numbered: lists can have millions of lines, and a
bad line is reported (BadLine) without stopping the rest.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from fetcher.naming import safe_relpath, url_to_path

_BOM = "\ufeff"
_INDENT = (" ", "\t")
_HEX = re.compile(r"[0-9A-Fa-f]+")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_HOST_PORT = re.compile(r"[^:/]+:\d+(?:/|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# shake_* have no fixed digest size, so no checksum can name them.
_ALGORITHMS = frozenset(a for a in hashlib.algorithms_guaranteed if hashlib.new(a).digest_size)
_ARIA2_ALGORITHMS = {
    "md5": "md5",
    "sha-1": "sha1",
    "sha-224": "sha224",
    "sha-256": "sha256",
    "sha-384": "sha384",
    "sha-512": "sha512",
}
_MIRRORS = "several URLs on one line (mirrors) are not supported"
_ORPHAN = "option without a URL above it"


@dataclass(frozen=True, slots=True)
class Checksum:
    """An expected digest of the whole file."""

    algorithm: str  # a hashlib name
    hexdigest: str  # lowercase

    def __str__(self) -> str:
        return f"{self.algorithm}={self.hexdigest}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One URL to fetch, with its options."""

    url: str
    line: int  # of the URL line; for parse_inline, the URL's position; 0 otherwise
    out: str | None = None  # relative to the store, already safe_relpath-checked
    checksum: Checksum | None = None

    def to_line(self) -> str:
        """The entry as a list line that parses back to it (for failed.txt).

        Entries from a list always round-trip; an ``out`` built elsewhere must
        hold no whitespace, which the list format cannot express.
        """
        fields = [self.url]
        if self.out is not None:
            fields.append(f"out={self.out}")
        if self.checksum is not None:
            fields.append(str(self.checksum))
        return "  ".join(fields)


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that yields no entry, and why."""

    line: int
    text: str  # the raw line, stripped
    reason: str
    url: str | None  # the entry's URL when the problem is in its options


def parse_checksum(key: str, value: str) -> Checksum:
    """``<hashlib name>=HEX`` or aria2's ``checksum=<algo>=HEX`` as a Checksum.

    Raises ValueError with a message fit for the user.
    """
    name = key.lower()
    if name == "checksum":
        algo, sep, value = value.partition("=")
        if not sep:
            raise ValueError("checksum= must be <algorithm>=<hex digest>")
        name = _ARIA2_ALGORITHMS.get(algo.lower(), algo.lower())
        if name not in _ALGORITHMS:
            raise ValueError(f"unsupported checksum algorithm {algo!r}")
    elif name not in _ALGORITHMS:
        raise ValueError(f"unknown option {key!r}")
    size = hashlib.new(name).digest_size * 2
    if len(value) != size or not _HEX.fullmatch(value):
        raise ValueError(f"bad {name} checksum: expected {size} hex digits")
    return Checksum(name, value.lower())


def _url_problem(url: str) -> str | None:
    """Why ``url`` cannot be fetched (and named), or None when it can."""
    scheme = _SCHEME.match(url)
    if scheme is None or _HOST_PORT.match(url):
        return "not a valid http(s) URL"
    if scheme[1].lower() not in ("http", "https"):
        return f"unsupported scheme {scheme[1].lower()!r}"
    if _CONTROL.search(url):
        return "not a valid http(s) URL: control characters"
    try:
        url_to_path(url)  # every entry must have a name in the store
    except ValueError:
        return "not a valid http(s) URL"
    return None


class _Pending:
    """The entry being read: its URL line, options so far, first problem."""

    __slots__ = ("url", "line", "out", "dir", "checksum", "problem")

    def __init__(self, url: str, line: int) -> None:
        self.url = url
        self.line = line
        self.out: str | None = None
        self.dir: str | None = None
        self.checksum: Checksum | None = None
        self.problem: BadLine | None = None

    def add(self, token: str, line: int, text: str) -> None:
        """Apply one ``key=value`` token; remember only the first problem."""
        if self.problem is None:
            try:
                self._apply(token)
            except ValueError as exc:
                self.problem = BadLine(line, text, str(exc), self.url)

    def _apply(self, token: str) -> None:
        key, sep, value = token.partition("=")
        if "://" in key:
            raise ValueError("a URL on an indented line (indented lines hold options)")
        if not sep:
            raise ValueError(f"expected key=value, got {token!r}")
        name = key.lower()
        if name in ("out", "dir"):
            if getattr(self, name) is not None:
                raise ValueError(f"duplicate option {key!r}")
            try:
                setattr(self, name, safe_relpath(value))
            except ValueError as exc:
                raise ValueError(f"{name}= must be a relative path inside the store ({exc})") from None
        else:
            checksum = parse_checksum(key, value)
            if self.checksum is not None:
                raise ValueError("more than one checksum")
            self.checksum = checksum

    def finish(self) -> Entry | BadLine:
        if self.problem is not None:
            return self.problem
        out = self.out
        if self.dir is not None:
            out = f"{self.dir}/{out or url_to_path(self.url).rpartition('/')[2]}"
        return Entry(self.url, self.line, out, self.checksum)


def parse_lines(lines: Iterable[str], *, first_line: int = 1) -> Iterator[Entry | BadLine]:
    """Entries and bad lines of a URL list, in order, reading lazily.

    Holds only the entry being read: it is yielded when the next URL line (or
    the end) shows that its options are complete. Blank and comment lines do
    not end an option block (as in aria2). Entries are not de-duplicated.
    """
    pending: _Pending | None = None
    orphans_reported = False
    for number, raw in enumerate(lines, first_line):
        text = raw.rstrip("\r\n")
        if number == first_line:
            text = text.removeprefix(_BOM)
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if text.startswith(_INDENT):
            if pending is not None:
                for token in stripped.split():
                    pending.add(token, number, stripped)
            elif not orphans_reported:
                orphans_reported = True
                yield BadLine(number, stripped, _ORPHAN, None)
            continue
        if pending is not None:
            yield pending.finish()
            pending = None
        orphans_reported = False
        url, *options = stripped.split()
        problem = _url_problem(url)
        if problem is not None:
            yield BadLine(number, stripped, problem, None)
            continue
        pending = _Pending(url, number)
        if any("://" in token.partition("=")[0] for token in options):
            pending.problem = BadLine(number, stripped, _MIRRORS, url)
        for token in options:
            pending.add(token, number, stripped)
    if pending is not None:
        yield pending.finish()


def parse_inline(text: str) -> Iterator[Entry | BadLine]:
    """Whitespace-separated URLs (``-a urls="URL URL ..."``), no options.

    ``line`` is the URL's 1-based position in ``text``.
    """
    for position, match in enumerate(re.finditer(r"\S+", text), 1):
        url = match[0]
        problem = _url_problem(url)
        yield Entry(url, position) if problem is None else BadLine(position, url, problem, None)
