"""Where a download lands in the store: names derived from URLs, and checks on
user-given relative paths, so that no URL and no list entry can write outside
the store or onto another download's file.

Pure functions, no Scrapy: the spider, the pipeline and the list parser all
call them, and they are testable on their own.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path
from urllib.parse import urlsplit

INDEX_NAME = "index.html"
EMPTY_SEGMENT = "%"
MAX_SEGMENT_BYTES = 200
_DEFAULT_PORTS = {"http": 80, "https": 443}
_DOT_SEGMENTS = {".": "%2E", "..": "%2E%2E"}
# Shortened names are cut to at most this many bytes (on a token boundary, so
# at least _PREFIX_BYTES - 3), then get "~" + 16 hex digits: 201..220 bytes in
# all, always longer than any name that was not shortened (<= 200 bytes).
_PREFIX_BYTES = 187
_HASH_HEX = 16
_MAX_EXT_BYTES = 16
_CONTROLS = frozenset(chr(c) for c in (*range(0x20), 0x7F))
_PATH_ESCAPED = _CONTROLS | {"/", "\\", "%", "?"}
_QUERY_ESCAPED = _CONTROLS | {"/", "\\"}
# The escapes a query name can contain; a literal "%" followed by one of
# these is itself written "%25" so that every query maps to its own name.
_QUERY_ESCAPE_CODES = frozenset(f"{ord(c):02X}" for c in _QUERY_ESCAPED | {"%"})
# Segments and queries without these are names already (the common case).
_PLAIN_SEGMENT = re.compile(r"[^%\\\x00-\x1f\x7f\ud800-\udfff]*")
_PLAIN_QUERY = re.compile(r"[^%/\\\x00-\x1f\x7f]*")
_HOST_ESCAPED = re.compile(r"[%/\\?\x00-\x1f\x7f]")
_BRACKETED = re.compile(r"\[[^\]]*\](?::\d*)?")
_SEGMENT_TOKENS = re.compile(r"(?:%[0-9A-Fa-f]{2})+|%|[^%]+")
_NAME_TOKENS = re.compile(r"%[0-9A-F]{2}|%%|.", re.DOTALL)
_DRIVE = re.compile(r"[A-Za-z]:")


def _pct(char: str) -> str:
    """Percent-encode one character as its UTF-8 bytes, uppercase hex."""
    return "".join(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))


def _name_from_bytes(data: bytes) -> str:
    """Decoded bytes as readable text; bytes that are not UTF-8 and characters
    a file name must not hold stay percent-encoded."""
    out = []
    for ch in data.decode("utf-8", "surrogateescape"):
        if "\udc80" <= ch <= "\udcff":
            out.append(f"%{ord(ch) - 0xDC00:02X}")
        elif ch in _PATH_ESCAPED:
            out.append(_pct(ch))
        else:
            out.append(ch)
    return "".join(out)


def _path_segment(raw: str) -> str:
    """One URL path segment as one file name segment (see url_to_path).

    A "%" not followed by two hex digits is not an escape; it is written "%%"
    so that `/a%zz` and `/a%25zz` (which really is "%zz") keep apart.
    """
    if _PLAIN_SEGMENT.fullmatch(raw):
        return _DOT_SEGMENTS.get(raw, raw)
    parts: list[str] = []
    pending = bytearray()
    for token in _SEGMENT_TOKENS.findall(raw):
        if token == "%":
            parts.append(_name_from_bytes(bytes(pending)))
            parts.append("%%")
            pending.clear()
        elif token[0] == "%":
            pending += bytes.fromhex(token.replace("%", ""))
        else:
            pending += token.encode("utf-8", "surrogatepass")
    parts.append(_name_from_bytes(bytes(pending)))
    name = "".join(parts)
    return _DOT_SEGMENTS.get(name, name)


def _query(query: str) -> str:
    """The query as written, minus what a file name cannot hold.

    "/", "\\" and control characters become %XX; a literal "%" becomes "%25"
    only where it would otherwise read as one of those escapes (or as "%25"),
    so common queries stay as written and distinct queries stay distinct.
    """
    if _PLAIN_QUERY.fullmatch(query):
        return query
    out = []
    for i, ch in enumerate(query):
        if ch in _QUERY_ESCAPED:
            out.append(_pct(ch))
        elif ch == "%" and query[i + 1 : i + 3] in _QUERY_ESCAPE_CODES:
            out.append("%25")
        else:
            out.append(ch)
    return "".join(out)


def _host(host: str) -> str:
    """The host as one name segment: no decoding, unsafe characters escaped."""
    name = _HOST_ESCAPED.sub(lambda m: _pct(m[0]), host)
    return _DOT_SEGMENTS.get(name, name)


def _shorten(name: str) -> str:
    """Keep a segment within file system limits, deterministically.

    Over MAX_SEGMENT_BYTES: the first bytes (cut between escapes and whole
    characters), "~", 16 hex digits of the sha1 of the full segment, and the
    extension of the path part when it is short.
    """
    if len(name) <= MAX_SEGMENT_BYTES // 4:  # at most 4 bytes a character
        return name
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) <= MAX_SEGMENT_BYTES:
        return name
    digest = hashlib.sha1(encoded).hexdigest()[:_HASH_HEX]
    ext = os.path.splitext(name.partition("?")[0])[1]
    if len(ext.encode("utf-8", "surrogatepass")) > _MAX_EXT_BYTES:
        ext = ""
    prefix, size = [], 0
    for token in _NAME_TOKENS.findall(name):
        size += len(token.encode("utf-8", "surrogatepass"))
        if size > _PREFIX_BYTES:
            break
        prefix.append(token)
    return f"{''.join(prefix)}~{digest}{ext}"


def url_to_path(url: str, *, keep_query: bool = True) -> str:
    """The store-relative path for an http(s) URL: ``<host>[:port]/<url path>[?query]``.

    Readable (segments are percent-decoded) yet deterministic and free of
    collisions between distinct resources:

    - host lowercased, port kept only when not the scheme's default, IPv6
      literals in brackets (``[::1]:8080``); user info is dropped.
    - in path segments "/", "\\", "%", "?" and control characters stay (or
      become) %XX with uppercase hex, as do bytes that are not UTF-8. Every
      literal "%" in a segment thus starts an escape: ``%XX``, or ``%%`` for a
      "%" the URL did not follow with two hex digits.
    - a segment "." or ".." (also spelled ``%2e``) becomes ``%2E`` or
      ``%2E%2E``; an empty segment (``//``) becomes ``%``. No other segment
      can produce these, since "." is never escaped otherwise and a lone "%"
      is never an escape.
    - an empty path or a trailing "/" names the file ``index.html`` (wget's
      convention), so ``/a/`` and ``/a/index.html`` share a name.
    - the query is appended as "?" + query (the first "?" of a name is always
      the query's, since path segments escape theirs), unless *keep_query* is
      False; the fragment is dropped, as is an empty query.
    - a segment over 200 bytes is cut and gets a sha1-based suffix (see
      _shorten); shortened names are 201-220 bytes, so they never meet a
      segment that was not shortened.

    Deliberately shared names (equivalent URLs): http/https, host case,
    default ports, user info, fragments, ``%41`` vs ``A`` and other escapes of
    characters kept literally. Names are for POSIX, case-sensitive file
    systems. Raises ValueError for anything but an http(s) URL with a host.
    """
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"URL has no host: {url!r}")
    # urlsplit stops lowercasing at a "%" (IPv6 zone ids are case-sensitive)
    host = f"[{host}]" if ":" in host else host.lower()
    authority = parts.netloc.rpartition("@")[2]
    if authority.startswith("[") and not _BRACKETED.fullmatch(authority):
        raise ValueError(f"text after the IPv6 address: {url!r}")
    port = parts.port  # ValueError when it is not a number in 0-65535
    if port is not None and port != _DEFAULT_PORTS[parts.scheme]:
        host = f"{host}:{port}"
    raw = parts.path.removeprefix("/").split("/")
    segments = [_path_segment(s) if s else EMPTY_SEGMENT for s in raw[:-1]]
    segments.append(_path_segment(raw[-1]) if raw[-1] else INDEX_NAME)
    if parts.query and keep_query:
        segments[-1] += "?" + _query(parts.query)
    return "/".join([_shorten(_host(host)), *map(_shorten, segments)])


#: The names of a file's partial body and of its resume state, beside the file.
PART_SUFFIX = ".part"
META_SUFFIX = ".part.meta"
SEGMENTS_SUFFIX = ".part.segments"


def owner_name(path: str) -> str:
    """The file a name belongs to: ``a/x`` for ``a/x.part``, ``a/x.part.meta`` and
    ``a/x.part.segments``, else the name itself. A file and its partial files share one
    claim and one lock: one URL's ``.part`` can never be another's file at the same time."""
    for suffix in (SEGMENTS_SUFFIX, META_SUFFIX, PART_SUFFIX):
        if path.endswith(suffix) and len(path) > len(suffix):
            return path[: -len(suffix)]
    return path


def safe_relpath(path: str) -> str:
    """Validate a relative path the user wrote (``out=``, ``dir=``).

    It is taken literally (no percent-decoding: it is a path, not a URL) and
    must stay inside the store on any platform: no absolute or drive paths,
    no backslashes, no control characters, no "." or ".." segments, no
    trailing "/". Returns it with duplicate slashes collapsed; raises
    ValueError with the reason otherwise.
    """
    if not path:
        raise ValueError("empty path")
    if any(ch in _CONTROLS for ch in path):
        raise ValueError("control characters (or NUL) in path")
    if "\\" in path:
        raise ValueError("backslash in path")
    if path.startswith("/") or _DRIVE.match(path):
        raise ValueError("absolute path")
    if path.endswith("/"):
        raise ValueError("path ends with '/'")
    segments = [s for s in path.split("/") if s]
    for segment in segments:
        if segment in (".", ".."):
            raise ValueError(f"{segment!r} segment in path")
        if len(segment.encode("utf-8", "surrogatepass")) > 255:
            raise ValueError("path segment longer than 255 bytes")
    return "/".join(segments)


def resolve_in_store(store: str | os.PathLike[str], relpath: str, *, resolved: bool = False,
                     known_dirs: set[str] | None = None) -> Path:
    """The absolute path of ``relpath`` in ``store``, refusing any way out.

    The store itself may be a symlink (it is resolved once), but no existing
    component below it may be: a symlink planted inside the store would
    otherwise carry writes anywhere. Checks only, creates nothing; the
    caller must still not follow symlinks created after this check.
    ``resolved``: the caller resolved the store already (once per run, not per file).
    ``known_dirs``: folders found to be real folders by earlier calls of this run,
    not checked again (one lstat per new folder, not one per folder per file).
    """
    root = str(store) if resolved else str(Path(store).resolve())
    rel = safe_relpath(relpath)
    target = os.path.normpath(f"{root}/{rel}")
    if target == root or not target.startswith(root.rstrip("/") + "/"):
        raise ValueError(f"{relpath!r} is outside the store")
    current = root
    for part in rel.split("/"):
        current = f"{current}/{part}"
        if known_dirs is not None and current in known_dirs:
            continue
        try:
            mode = os.lstat(current).st_mode
        except (FileNotFoundError, NotADirectoryError):
            break  # nothing exists below this point
        if stat.S_ISLNK(mode):
            raise ValueError(f"{current} is a symbolic link")
        if known_dirs is not None and stat.S_ISDIR(mode):
            known_dirs.add(current)
    return Path(target)
