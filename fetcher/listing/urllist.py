"""The URL list format: aria2c input files, plus a compact same-line form.

An aria2c list works unchanged, and ``aria2c -i`` reads what Entry.to_line
writes (fetcher's failed.txt)::

    # comments and blank lines are ignored
    https://host/a/file.iso
    https://host/b.iso   out=isos/b.iso   sha256=<64 hex>
    https://host/c.iso\thttps://mirror/c.iso
      out=c.iso
      checksum=sha-256=<64 hex>
      header=Authorization: Bearer xyz
      split=4

URL lines start in the first column. Several URIs on one URL line are mirrors
of one file: aria2 separates them with TABs; in fetcher's same-line form any
whitespace-separated token whose part before the first "=" holds "://" is a
mirror too. The first URI is Entry.url (it names the file by default), the
others are Entry.mirrors.

Options, with aria2's names:

- ``out=``, ``dir=``: where the file lands, *always relative to the store*
  (FILES_STORE). An absolute or escaping path fails the entry. This differs
  from aria2, where ``dir=`` is any directory (relative ones to aria2's
  working directory): fetcher never writes outside its store. ``dir=`` and
  ``out=`` are joined into Entry.out (``dir=`` alone keeps the URL's name).
- ``checksum=<algo>=HEX`` (aria2 algorithm names sha-1, sha-224, sha-256,
  sha-384, sha-512, md5, or a hashlib name) and ``<hashlib name>=HEX``.
- ``header=Name: value`` (repeatable, accumulates), ``referer=`` (aria2's
  ``*``, meaning "the URI being fetched", is kept as is for the caller),
  ``user-agent=``, ``split=N`` (a positive integer).

Two ways to write options:

- on the URL line (fetcher's same-line form): whitespace-separated
  ``key=value`` tokens, so values cannot hold spaces;
- on indented lines below it (aria2's form): one option per line, the name
  and value stripped (spaces around "=" allowed), the value running to the
  end of the line (``  header=Authorization: Bearer x y``).

Blank and comment lines (also indented ones) do not end an option block. A
repeated option: the last one wins, with a warning (``header=`` accumulates);
several checksum options count as one option.

Warnings, not failures (the URL is still downloaded): options aria2 knows
but fetcher does not implement (``continue=``, ``max-tries=``, ...), unknown
or misspelt option names (with a "did you mean" when close to a known one),
an indented line without "=" (aria2 ignores it), a repeated option, an
indented value that seems to hold a second option, and a URL on an indented
line. aria2 would read that line as an option; fetcher makes it an entry of
its own (the entry above is unaffected) so that no URL of the list goes
without a record.

Warnings are delivered on the entry they concern: ``Entry.warnings`` (and
``BadLine.warnings``), a tuple of ListWarning(line, option, message) in list
order. ``option`` is the key to log once per run: the option name as written
(lowercased) or, for warnings about a line rather than an option, a
bracketed pseudo-name ("<indented-url>", "<no-equals>"). Messages never
quote option values (they may be secrets). ``warnings`` and ``inline`` take
no part in equality: an entry equals what to_line writes of it, parsed back.

Failures (a BadLine instead of the entry): a URL or mirror that is not a
valid http(s) URL, an unsafe ``out=``/``dir=``, a malformed checksum, an
unknown option name that is a hashlib algorithm fetcher cannot use
(``shake_128``) or whose value is a digest (32 or more hex digits: a
checksum fetcher would otherwise silently not check), a malformed
``header=``, a bad ``split=``, control characters in a value, and on the
URL line a token without "=". The first problem of an entry is reported,
once: a refused URL line keeps the option lines below it (they are not read).

Limits, that no real list meets, so that a damaged or hostile list cannot
take the memory: a line of more than MAX_LINE characters (its line end not
counted) and an entry of more than MAX_OPTIONS options (option lines and
same-line options) are refused, the rest of the list read on; each is a
keyword argument of the functions below. A comment is ignored whatever its
length. A list's length has no limit. An entry that Entry.to_line would
write back with a line over the limit (``dir=`` and ``out=`` joined) is
refused too: the queue and failed.txt carry to_line's text, and what was
accepted must read back the same under the same limits.

Parsing is lazy and line-numbered: lists can have millions of lines, and a
bad line is reported (BadLine) without stopping the rest. BadLine.where and
Entry.where read "line N", or "URL N" for parse_inline results.

Lines end at "\\n" (or "\\r\\n") only, wherever a list is read (open_list,
text_lines, parse_text): a lone "\\r", U+2028, "\\x85" and the other ends
str.splitlines knows are inside a line, so that the queue worker reads an
entry's text exactly as the enqueuer read its lines. open_list and
text_lines read a list as UTF-8 (undecodable bytes replaced), gzip-compressed
or not, and never hold an over-long line whole.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import io
import os
import re
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, BinaryIO, TextIO, TypeVar

from fetcher.store.naming import safe_relpath, url_to_path

_BOM = "\ufeff"
_INDENT = (" ", "\t")
_HEX = re.compile(r"[0-9A-Fa-f]+")
_DIGEST_LIKE = re.compile(r"[0-9A-Fa-f]{32,}")
_DIGITS = re.compile(r"[0-9]+")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_HOST_PORT = re.compile(r"[^:/]+:\d+(?:/|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_EMBEDDED_OPTION = re.compile(r"\s([A-Za-z0-9_-]+)\s*=")
_GZIP_MAGIC = b"\x1f\x8b"
# shake_* have no fixed digest size, so no checksum can name them.
_ALGORITHMS = frozenset(a for a in hashlib.algorithms_guaranteed if hashlib.new(a).digest_size)
_UNUSABLE_ALGORITHMS = frozenset(a.lower() for a in hashlib.algorithms_available) - _ALGORITHMS
_ARIA2_ALGORITHMS = {
    "md5": "md5",
    "sha-1": "sha1",
    "sha-224": "sha224",
    "sha-256": "sha256",
    "sha-384": "sha384",
    "sha-512": "sha512",
}
_ARIA2_NAMES = {name: aria2 for aria2, name in _ARIA2_ALGORITHMS.items()}
_IMPLEMENTED = frozenset({"out", "dir", "checksum", "header", "referer", "user-agent", "split"})
# The options aria2c 1.36 accepts in an input file (its manual, "Input File"),
# minus those fetcher implements: a warning each, never a failure.
_ARIA2_ONLY = frozenset(
    """
    all-proxy all-proxy-passwd all-proxy-user allow-overwrite allow-piece-length-change
    always-resume async-dns auto-file-renaming bt-enable-hook-after-hash-check bt-enable-lpd
    bt-exclude-tracker bt-external-ip bt-force-encryption bt-hash-check-seed
    bt-load-saved-metadata bt-max-peers bt-metadata-only bt-min-crypto-level
    bt-prioritize-piece bt-remove-unselected-file bt-request-peer-speed-limit
    bt-require-crypto bt-save-metadata bt-seed-unverified bt-stop-timeout bt-tracker
    bt-tracker-connect-timeout bt-tracker-interval bt-tracker-timeout check-integrity
    conditional-get connect-timeout content-disposition-default-utf8 continue dry-run
    enable-http-keep-alive enable-http-pipelining enable-mmap enable-peer-exchange
    file-allocation follow-metalink follow-torrent force-save ftp-passwd ftp-pasv ftp-proxy
    ftp-proxy-passwd ftp-proxy-user ftp-reuse-connection ftp-type ftp-user gid
    hash-check-only http-accept-gzip http-auth-challenge http-no-cache http-passwd
    http-proxy http-proxy-passwd http-proxy-user http-user https-proxy https-proxy-passwd
    https-proxy-user index-out lowest-speed-limit max-connection-per-server
    max-download-limit max-file-not-found max-mmap-limit max-resume-failure-tries max-tries
    max-upload-limit metalink-base-uri metalink-enable-unique-protocol metalink-language
    metalink-location metalink-os metalink-preferred-protocol metalink-version
    min-split-size no-file-allocation-limit no-netrc no-proxy parameterized-uri pause
    pause-metadata piece-length proxy-method realtime-chunk-checksum remote-time
    remove-control-file retry-wait reuse-uri rpc-save-upload-metadata seed-ratio seed-time
    select-file ssh-host-key-md stream-piece-selector timeout uri-selector use-head
    """.split()
)
_KNOWN = _IMPLEMENTED | _ARIA2_ONLY | _ALGORITHMS
_CHECKSUM = "checksum"  # the one option all checksum spellings count as
_ORPHAN = "option without a URL above it"
MAX_LINE = 64 * 1024  # characters: a presigned URL or a JWT header= is a few KiB
MAX_OPTIONS = 1000  # per entry
_PREVIEW = 100  # characters of an over-long line shown in its BadLine (at most the limit)
_CHUNK = 64 * 1024  # characters read at a time of an over-long line, and dropped
_ONE_PER_LINE = "an indented line holds one option, its value runs to the end of the line"
NO_EQUALS = "<no-equals>"
INDENTED_URL = "<indented-url>"


@dataclass(frozen=True, slots=True)
class Checksum:
    """An expected digest of the whole file."""

    algorithm: str  # a hashlib name
    hexdigest: str  # lowercase

    def __str__(self) -> str:
        return f"{self.algorithm}={self.hexdigest}"


@dataclass(frozen=True, slots=True)
class ListWarning:
    """Something in the list fetcher ignores or reinterprets; the entry stands.

    ``option`` is the key to report once per run (see the module docstring).
    """

    line: int
    option: str
    message: str

    @property
    def where(self) -> str:
        return f"line {self.line}"


def _where(position: int, inline: bool) -> str:
    if position <= 0:
        return ""
    return f"URL {position}" if inline else f"line {position}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One file to fetch, with its options."""

    url: str  # names the file unless out= says otherwise
    line: int  # of the URL line; for parse_inline, the URL's position; 0 otherwise
    out: str | None = None  # relative to the store, safe_relpath-checked, dir= joined in
    checksum: Checksum | None = None
    mirrors: tuple[str, ...] = ()  # other URIs of the same file, validated like url
    headers: tuple[tuple[str, str], ...] = ()  # (name, value), in list order
    referer: str | None = None  # "*" is aria2's "the URI being fetched"
    user_agent: str | None = None
    split: int | None = None  # aria2's split=: connections per file (positive)
    inline: bool = field(default=False, compare=False)  # from parse_inline: line is a URL position
    warnings: tuple[ListWarning, ...] = field(default=(), compare=False)

    @property
    def urls(self) -> tuple[str, ...]:
        """The URL, then its mirrors."""
        return (self.url, *self.mirrors)

    @property
    def where(self) -> str:
        """"line N", "URL N" (parse_inline), or "" for an entry made elsewhere."""
        return _where(self.line, self.inline)

    def to_line(self) -> str:
        """The entry in aria2's syntax, parsing back to it (for failed.txt).

        The URL and its mirrors TAB-separated, then one option per indented
        line; lines are joined with "\\n", with no final newline. Entries
        parsed from a list always round-trip; for one built elsewhere,
        raises ValueError when a value cannot be written (whitespace in a URL,
        control characters, surrounding whitespace).
        """
        for url in self.urls:
            if not url or _CONTROL.search(url) or any(ch.isspace() for ch in url):
                raise ValueError(f"URL cannot be written in a list: {url!r}")
        for mirror in self.mirrors:
            if "://" not in mirror.partition("=")[0]:
                raise ValueError(f"mirror would not read back as a URL: {mirror!r}")
        lines = ["\t".join(self.urls)]

        def add(name: str, value: str) -> None:
            if value != value.strip() or _CONTROL.search(value):
                raise ValueError(f"{name}= value cannot be written in a list: {value!r}")
            lines.append(f"  {name}={value}")

        if self.out is not None:
            name = url_to_path(self.url).rpartition("/")[2] if self.out.strip() != self.out else None
            head, sep, tail = self.out.rpartition("/")
            if name is not None and sep and tail == name:
                add("dir", head)  # the default name ends in a space: dir= alone gives it back
            else:
                add("out", self.out)
        if self.checksum is not None:
            algorithm, digest = self.checksum.algorithm, self.checksum.hexdigest
            if algorithm in _ARIA2_NAMES:
                add("checksum", f"{_ARIA2_NAMES[algorithm]}={digest}")
            else:
                add(algorithm, digest)
        for header, value in self.headers:
            if not _HEADER_NAME.fullmatch(header):
                raise ValueError(f"not a header name: {header!r}")
            add("header", f"{header}: {value}" if value else f"{header}:")
        if self.referer is not None:
            add("referer", self.referer)
        if self.user_agent is not None:
            add("user-agent", self.user_agent)
        if self.split is not None:
            if self.split < 1:
                raise ValueError(f"split= must be positive: {self.split}")
            add("split", str(self.split))
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that yields no entry, and why."""

    line: int  # for parse_inline, the URL's position
    text: str  # the raw line (the URL for parse_inline), stripped
    reason: str
    url: str | None  # the entry's URL when the problem is in its options or mirrors
    inline: bool = field(default=False, compare=False)  # from parse_inline
    warnings: tuple[ListWarning, ...] = field(default=(), compare=False)

    @property
    def where(self) -> str:
        """"line N", or "URL N" for parse_inline: phrase messages with it."""
        return _where(self.line, self.inline)


def parse_checksum(key: str, value: str) -> Checksum:
    """``<hashlib name>=HEX`` or aria2's ``checksum=<algo>=HEX`` as a Checksum.

    Raises ValueError with a message fit for the user.
    """
    name = key.lower()
    if name == _CHECKSUM:
        algo, sep, value = value.partition("=")
        if not sep:
            raise ValueError("checksum= must be <algorithm>=<hex digest>")
        algo, value = algo.strip(), value.strip()
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


def _is_url_token(token: str) -> bool:
    """A URL (or mirror), as opposed to a ``key=value`` option."""
    return "://" in token.partition("=")[0]


def _suggestion(name: str) -> str:
    close = difflib.get_close_matches(name, sorted(_IMPLEMENTED | _ARIA2_ONLY), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _plain_text(name: str, value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError(f"control characters in {name}=")
    return value


def _parse_header(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition(":")
    if not sep or not _HEADER_NAME.fullmatch(name):
        raise ValueError("header= must be 'Name: value' with a valid header name")
    return name, _plain_text("header", rest.strip())


def _parse_split(value: str) -> int:
    if not _DIGITS.fullmatch(value) or int(value) < 1:
        raise ValueError("split= must be a positive integer")
    return int(value)


def _too_long(length: int, limit: int) -> str:
    """Why a line is refused, saying its length: it is not shown whole."""
    return f"line of {length:,} characters is over the {limit:,} limit"


def _cut(text: str) -> str:
    """The start of a long line, enough to find it in the list."""
    return text if len(text) <= _PREVIEW else f"{text[:_PREVIEW]}..."


class _Pending:
    """The entry being read: its URL line, options so far, first problem."""

    __slots__ = ("url", "line", "text", "mirrors", "out", "dir", "checksum", "headers", "referer",
                 "user_agent", "split", "seen", "warnings", "problem", "max_line", "max_options", "options",
                 "too_many")

    def __init__(self, url: str, line: int, text: str, warnings: list[ListWarning], *, max_line: int,
                 max_options: int, problem: BadLine | None = None) -> None:
        self.url = url
        self.line = line
        self.text = text
        self.mirrors: list[str] = []
        self.out: str | None = None
        self.dir: str | None = None
        self.checksum: Checksum | None = None
        self.headers: list[tuple[str, str]] = []
        self.referer: str | None = None
        self.user_agent: str | None = None
        self.split: int | None = None
        self.seen: set[str] = set()
        self.warnings = warnings
        self.problem = problem
        self.max_line = max_line
        self.max_options = max_options
        self.options = 0  # counted on after a problem, to say how many there were
        self.too_many = False

    @classmethod
    def start(cls, text: str, line: int, *, indented: bool, too_long: str | None, max_line: int,
              max_options: int) -> _Pending:
        """The entry a URL line (stripped) begins. A refused line begins a refused
        entry all the same, so that the option lines below it stay its own."""
        warnings: list[ListWarning] = []
        if indented:
            warnings.append(ListWarning(line, INDENTED_URL, "URL on an indented line (aria2 would read the "
                                        "line as an option); fetched as an entry of its own"))
        url, *tokens = [""] if too_long is not None else text.split()
        problem = too_long or _url_problem(url)
        pending = cls(url, line, text, warnings, max_line=max_line, max_options=max_options,
                      problem=None if problem is None else BadLine(line, text, problem, None))
        for token in tokens:  # not read when the URL is refused
            pending.add_token(token)
        return pending

    def _counted(self, line: int, text: str) -> bool:
        """Count one more option: False once the entry has failed, so that it
        keeps nothing more (millions of option lines must not take memory)."""
        self.options += 1
        if self.options > self.max_options and self.problem is None:
            self.problem = BadLine(line, _cut(text), "", self.url)  # the reason, with the count, at finish
            self.too_many = True
        return self.problem is None

    def _fail(self, line: int, text: str, reason: str) -> None:
        if self.problem is None:
            self.problem = BadLine(line, text, reason, self.url)

    def _warn(self, line: int, option: str, message: str) -> None:
        self.warnings.append(ListWarning(line, option, message))

    def add_token(self, token: str) -> None:
        """One whitespace-separated token after the URL on its line."""
        if self.problem is not None:
            return
        if _is_url_token(token):  # a mirror: no option, and bounded by the line's limit
            problem = _url_problem(token)
            if problem is not None:
                self._fail(self.line, self.text, f"mirror {token}: {problem}")
            else:
                self.mirrors.append(token)
            return
        if not self._counted(self.line, self.text):
            return
        key, sep, value = token.partition("=")
        if not sep:
            self._fail(self.line, self.text,
                       f"expected key=value, got {token!r} (values with spaces go on an indented line)")
            return
        self._option(key, value, self.line, self.text, indented=False)

    def add_indented(self, text: str, line: int, too_long: str | None = None) -> None:
        """One indented option line (stripped), aria2's way; ``too_long`` says
        why the line is refused unread."""
        if not self._counted(line, text):
            return
        if too_long is not None:
            self._fail(line, text, too_long)
            return
        key, sep, value = text.partition("=")
        if not sep:
            self._warn(line, NO_EQUALS, "indented line without '=' is not an option; ignored")
            return
        self._option(key.strip(), value.strip(), line, text, indented=True)

    def _option(self, key: str, value: str, line: int, text: str, *, indented: bool) -> None:
        name = key.lower()
        hint = None
        if indented:
            embedded = _EMBEDDED_OPTION.search(value)
            if embedded and embedded[1].lower() in _KNOWN:
                hint = embedded[1].lower()
        try:
            applied = self._apply(name, key, value, line)
        except ValueError as exc:
            reason = f"{exc} ({_ONE_PER_LINE})" if hint else str(exc)
            self._fail(line, text, reason)
            return
        if applied and hint:
            self._warn(line, name, f"the value of {name}= holds '{hint}=': {_ONE_PER_LINE}")

    def _apply(self, name: str, key: str, value: str, line: int) -> bool:
        """Set one option; False when it is ignored (with a warning)."""
        slot = self._slot(name, key, value, line)
        if slot is None:
            return False
        if slot in self.seen and slot != "header":
            self._warn(line, name, f"{slot}= given more than once; the last one is used")
        self.seen.add(slot)
        self._set(slot, key, value)
        return True

    def _slot(self, name: str, key: str, value: str, line: int) -> str | None:
        """Which option *name* sets; None when it is ignored (with a warning)."""
        if name in _ALGORITHMS or name == _CHECKSUM:
            return _CHECKSUM
        if name in _IMPLEMENTED:
            return name
        if name in _UNUSABLE_ALGORITHMS:
            raise ValueError(f"unsupported checksum algorithm {key!r}")
        if name in _ARIA2_ONLY:
            self._warn(line, name, f"aria2 option {name!r} is not supported by fetcher; ignored")
            return None
        if _DIGEST_LIKE.fullmatch(value):
            raise ValueError(f"unknown option {key!r} with a digest as value: "
                             f"not a checksum algorithm fetcher knows{_suggestion(name)}")
        self._warn(line, name, f"unknown option {key!r}; ignored{_suggestion(name)}")
        return None

    def _set(self, slot: str, key: str, value: str) -> None:
        if slot in ("out", "dir"):
            try:
                path = safe_relpath(value)
            except ValueError as exc:
                where = " inside the store" if slot == "out" else ", taken under the store (FILES_STORE)"
                raise ValueError(f"{slot}= must be a relative path{where} ({exc})") from None
            setattr(self, slot, path)
        elif slot == _CHECKSUM:
            self.checksum = parse_checksum(key, value)
        elif slot == "header":
            self.headers.append(_parse_header(value))
        elif slot in ("referer", "user-agent"):
            setattr(self, slot.replace("-", "_"), _plain_text(slot, value))
        else:
            self.split = _parse_split(value)

    def finish(self) -> Entry | BadLine:
        warnings = tuple(self.warnings)
        if self.problem is not None:
            p = self.problem
            reason = (f"entry of {self.options:,} options is over the {self.max_options:,} limit" if self.too_many
                      else p.reason)
            return BadLine(p.line, p.text, reason, p.url, warnings=warnings)
        out = self.out
        if self.dir is not None:
            out = f"{self.dir}/{out or url_to_path(self.url).rpartition('/')[2]}"
        entry = Entry(self.url, self.line, out, self.checksum, tuple(self.mirrors), tuple(self.headers),
                      self.referer, self.user_agent, self.split, warnings=warnings)
        written = _written_over(entry, self.max_line)
        if written:
            return BadLine(self.line, _cut(self.text), f"written back (the queue, failed.txt), a line of "
                           f"{written:,} characters is over the {self.max_line:,} limit", self.url, warnings=warnings)
        return entry


def _written_over(entry: Entry, max_line: int) -> int:
    """The length of the longest line Entry.to_line writes when over ``max_line``
    (dir= and out= joined, "  " and ": " added), else 0: the queue's text and
    failed.txt must parse back, under the same limit, to the same entry."""
    longest_value = max(len(entry.out or ""), len(entry.referer or ""), len(entry.user_agent or ""),
                        *(len(name) + len(value) for name, value in entry.headers))
    if longest_value + len("  user-agent=") <= max_line:  # the longest name and padding to_line adds
        return 0
    longest = max(map(len, entry.to_line().split("\n")))
    return longest if longest > max_line else 0


def _line_text(raw: str, *, first: bool, max_line: int) -> tuple[str, str | None]:
    """A line without its line end ("\\n" or "\\r\\n" only) and BOM, and why it
    is over the limit, or None. An over-long line is cut to its start, alike
    from a reader's _Overlong (over the reader's limit) and from the whole."""
    text = raw[:-2] if raw.endswith("\r\n") else raw.removesuffix("\n")
    length, limit = (raw.length, raw.limit) if isinstance(raw, _Overlong) else (len(text), max_line)
    if first:
        text = text.removeprefix(_BOM)
    if length <= limit:
        return text, None
    return f"{text[:min(limit, _PREVIEW)]}...", _too_long(length, limit)


def parse_lines(lines: Iterable[str], *, first_line: int = 1, max_line: int = MAX_LINE,
                max_options: int = MAX_OPTIONS) -> Iterator[Entry | BadLine]:
    """Entries and bad lines of a URL list, in order, reading lazily.

    Holds only the entry being read: it is yielded when the next URL line (or
    the end) shows that its options are complete. Blank and comment lines do
    not end an option block (as in aria2). Entries are not de-duplicated.
    Each of ``lines`` is one line, with or without its line end. A line over
    ``max_line`` characters, or an entry over ``max_options`` options, is a
    BadLine (see the module docstring).
    """
    pending: _Pending | None = None
    orphans_reported = False
    for number, raw in enumerate(lines, first_line):
        text, too_long = _line_text(raw, first=number == first_line, max_line=max_line)
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indented = text.startswith(_INDENT)
        if indented and not _is_url_token(stripped.split(None, 1)[0]):
            if pending is not None:
                pending.add_indented(stripped, number, too_long)
            elif not orphans_reported:
                orphans_reported = True
                yield BadLine(number, stripped, _ORPHAN, None)
            continue
        if pending is not None:
            yield pending.finish()
        orphans_reported = False
        pending = _Pending.start(stripped, number, indented=indented, too_long=too_long, max_line=max_line,
                                 max_options=max_options)
    if pending is not None:
        yield pending.finish()


def parse_text(text: str, *, max_line: int = MAX_LINE, max_options: int = MAX_OPTIONS) -> Iterator[Entry | BadLine]:
    """parse_lines for a list held in one string, such as a queue entry (a URL
    line and its option lines, as Entry.to_line writes them). Its lines end
    only at "\\n", as a list file's: str.splitlines would also end one at
    U+2028 or a lone "\\r" inside a value the enqueuer accepted, making the
    rest of the value an option of its own (``out=`` elsewhere)."""
    return parse_lines(io.StringIO(text, newline="\n"), max_line=max_line, max_options=max_options)


def parse_inline(text: str) -> Iterator[Entry | BadLine]:
    """Whitespace-separated URLs (``-a urls="URL URL ..."``), no options.

    ``line`` is the URL's 1-based position in ``text`` and ``inline`` is
    set, so ``where`` reads "URL N".
    """
    for position, match in enumerate(re.finditer(r"\S+", text), 1):
        url = match[0]
        problem = _url_problem(url)
        if problem is None:
            yield Entry(url, position, inline=True)
        else:
            yield BadLine(position, url, problem, None, inline=True)


# Reading lists: plain or gzip, from a path or a binary stream.

_T = TypeVar("_T")


def _gzip_errors(read: Callable[..., _T]) -> Callable[..., _T]:
    def wrapper(self: _GzipReader, *args: object) -> _T:
        try:
            return read(self, *args)
        except (EOFError, zlib.error) as exc:
            raise gzip.BadGzipFile(f"corrupt or truncated gzip data: {exc}") from exc

    return wrapper


class _GzipReader(gzip.GzipFile):
    """A GzipFile over an open binary stream, closing it only if it owns it,
    whose truncated or corrupt data raises OSError (gzip.BadGzipFile) like
    any other read error, not EOFError or zlib.error."""

    def __init__(self, stream: IO[bytes], *, owned: bool) -> None:
        super().__init__(fileobj=stream, mode="rb")
        self._owned = stream if owned else None

    read = _gzip_errors(gzip.GzipFile.read)
    read1 = _gzip_errors(gzip.GzipFile.read1)
    peek = _gzip_errors(gzip.GzipFile.peek)
    readline = _gzip_errors(gzip.GzipFile.readline)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._owned is not None:
                self._owned.close()


class _Prefixed(io.RawIOBase):
    """Bytes already read from a stream, then the rest of the stream."""

    def __init__(self, prefix: bytes, stream: IO[bytes], *, owned: bool) -> None:
        self._prefix = prefix
        self._stream = stream
        self._owned = owned

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        if self._prefix:
            data, self._prefix = self._prefix[: len(view)], self._prefix[len(view) :]
        else:
            read1 = getattr(self._stream, "read1", None)
            data = read1(len(view)) if read1 is not None else self._stream.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed and self._owned:
            self._stream.close()
        super().close()


def _sniff(stream: IO[bytes], *, owned: bool) -> tuple[bool, IO[bytes]]:
    """Whether ``stream`` starts with gzip's magic, and a stream that still
    yields its first bytes: ``stream`` itself when it can peek them."""
    peek = getattr(stream, "peek", None)
    if peek is not None:
        head = peek(2)[:2]
        if len(head) == 2 or not head:
            return head == _GZIP_MAGIC, stream
    head = b""
    while len(head) < 2:
        chunk = stream.read(2 - len(head))
        if not chunk:
            break
        head += chunk
    return head == _GZIP_MAGIC, io.BufferedReader(_Prefixed(head, stream, owned=owned))


class _Overlong(str):
    """What a reader gives for a line over its limit: the line's first limit+1
    characters (parse_lines still sees its indentation and first word), and
    the whole line's length, its line end not counted."""

    length: int
    limit: int

    def __new__(cls, start: str, length: int, limit: int) -> _Overlong:
        line = super().__new__(cls, start)
        line.length = length
        line.limit = limit
        return line


class _ListText(io.TextIOWrapper):
    """A list as text: UTF-8, undecodable bytes replaced, lines ending at "\\n"
    only (newline="\\n": the default would also end one at a lone "\\r"). A
    line over ``max_line`` characters is never held whole, however long: it
    comes as an _Overlong, the rest of it read in chunks and dropped."""

    def __init__(self, binary: IO[bytes] | io.BufferedIOBase, *, max_line: int) -> None:
        super().__init__(binary, encoding="utf-8", errors="replace", newline="\n")  # type: ignore[arg-type]
        self._max_line = max_line

    def readline(self, size: int = -1, /) -> str:  # type: ignore[override] # as typeshed's TextIOWrapper
        """The next line (iteration reads with this), cut when over the limit."""
        if size >= 0:
            return super().readline(size)
        line = super().readline(self._max_line + 1)
        if len(line) <= self._max_line or line.endswith("\n"):
            return line
        length, tail = len(line), line[-1:]
        while chunk := super().readline(_CHUNK):
            length += len(chunk)
            if chunk.endswith("\n"):
                length -= 2 if (tail + chunk[-2:]).endswith("\r\n") else 1
                break
            tail = chunk[-1:]
        if length <= self._max_line:  # cut between its "\r" and "\n": it was not over
            return line + "\n"
        return _Overlong(line, length, self._max_line)


def open_list(path: str | os.PathLike[str], *, max_line: int = MAX_LINE) -> TextIO:
    """A list file as text (UTF-8, undecodable bytes replaced; parse_lines
    strips a BOM), gzip-decompressed when it starts with gzip's magic bytes
    or its name ends in ".gz". Close it (or use ``with``). Its lines end at
    "\\n" only; a line over ``max_line`` characters comes cut short, never
    held whole, and parse_lines refuses it.

    The file is opened once and sniffed, not reopened, so named pipes work.
    Gzip data that is truncated or corrupt, or a ".gz" file that is not
    gzip, raises gzip.BadGzipFile (an OSError) while reading.
    """
    raw = open(path, "rb")  # noqa: SIM115 - owned by the returned wrapper
    try:
        compressed, stream = _sniff(raw, owned=True)
        if os.fspath(path).lower().endswith(".gz"):
            compressed = True
        return _ListText(_GzipReader(stream, owned=True) if compressed else stream, max_line=max_line)
    except BaseException:
        raw.close()
        raise


def text_lines(stream: BinaryIO | IO[bytes], *, max_line: int = MAX_LINE) -> Generator[str, None, None]:
    """The lines of a binary stream (stdin's ``sys.stdin.buffer``) as text,
    gzip-decompressed when the stream starts with gzip's magic bytes. The
    magic is peeked, not consumed, when the stream can peek (a buffered
    stream); otherwise the bytes read to sniff are put back in front. Lines
    come as soon as they are complete (a pipe still being written is fine).
    UTF-8, undecodable bytes replaced, lines ending at "\\n" only, a line over
    ``max_line`` characters cut short (as open_list's). ``stream`` is left
    open, also when the generator is closed early. Corrupt gzip data raises
    an OSError.
    """
    compressed, source = _sniff(stream, owned=False)
    binary: IO[bytes] | io.BufferedIOBase = _GzipReader(source, owned=source is not stream) if compressed else source
    text = _ListText(binary, max_line=max_line)
    try:
        for line in text:  # not "yield from": closing this generator would close ``text``
            yield line
    finally:
        if binary is stream:
            text.detach()  # closing the wrapper would close the caller's stream
        else:
            text.close()
