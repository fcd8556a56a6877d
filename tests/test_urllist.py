"""The URL list format: entries, mirrors, options, warnings, bad lines, laziness,
round trips through to_line, and reading plain or gzip lists."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

import pytest

from fetcher.listing.urllist import (
    MAX_LINE,
    MAX_OPTIONS,
    BadLine,
    Checksum,
    Entry,
    ListWarning,
    open_list,
    parse_checksum,
    parse_inline,
    parse_lines,
    parse_text,
    text_lines,
)
from fetcher.store.naming import url_to_path

SHA = "0123456789abcdef" * 4
MD5 = "0123456789abcdef" * 2


def parse(text: str) -> list[Entry | BadLine]:
    return list(parse_lines(text.splitlines(keepends=True)))


def test_example_list() -> None:
    text = f"""# comments and blank lines are ignored
https://host/a/file.iso
https://host/b.iso   out=isos/b.iso   sha256={SHA.upper()}
https://host/c.iso
  out=c.iso
  checksum=sha-256={SHA}
"""
    assert parse(text) == [
        Entry("https://host/a/file.iso", 2),
        Entry("https://host/b.iso", 3, "isos/b.iso", Checksum("sha256", SHA)),
        Entry("https://host/c.iso", 4, "c.iso", Checksum("sha256", SHA)),
    ]


def test_aria2_style_options() -> None:
    text = (
        "\ufeffhttps://h/a\r\n"
        "\tdir=downloads\r\n"
        "\r\n"
        "# a comment inside the block\r\n"
        "   # an indented comment\r\n"
        "  out = x/a.bin\r\n"
        "  md5=" + MD5 + "\r\n"
        "https://h/b?q=1#frag\r\n"
        " dir=d\r\n"
        "https://h/\n"
        " dir=d//e\n"
    )
    assert parse(text) == [
        Entry("https://h/a", 1, "downloads/x/a.bin", Checksum("md5", MD5)),
        Entry("https://h/b?q=1#frag", 8, "d/b?q=1"),
        Entry("https://h/", 10, "d/e/index.html"),
    ]


def test_first_line_and_bom_only_on_first_line() -> None:
    assert list(parse_lines(["https://h/a"], first_line=10)) == [Entry("https://h/a", 10)]
    # A BOM elsewhere is no BOM: the line is not a URL.
    assert list(parse_lines(["https://h/a", "\ufeffhttps://h/b"]))[1] == BadLine(
        2, "\ufeffhttps://h/b", "not a valid http(s) URL", None
    )


def test_url_kept_as_written() -> None:
    url = "HTTPS://Host.example:443/a/../%7Euser/x%2fy?b=2&a=1#part"
    assert parse(f"{url}   \n") == [Entry(url, 1)]
    [indented] = parse(f"  \t{url}  \n")  # an entry of its own, with a warning
    assert indented == Entry(url, 1)
    assert [w.option for w in indented.warnings] == ["<indented-url>"]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("ftp://h/x", "unsupported scheme 'ftp'"),
        ("FILE:///etc/passwd", "unsupported scheme 'file'"),
        ("javascript:alert(1)", "unsupported scheme 'javascript'"),
        ("data:text/plain,hi", "unsupported scheme 'data'"),
        ("mailto:a@b", "unsupported scheme 'mailto'"),
        ("host.example/x", "not a valid http(s) URL"),
        ("localhost:8080/x", "not a valid http(s) URL"),
        ("http:/x", "not a valid http(s) URL"),
        ("http://", "not a valid http(s) URL"),
        ("https://:443/x", "not a valid http(s) URL"),
        ("http://h:99999/x", "not a valid http(s) URL"),
        ("http://[::1/x", "not a valid http(s) URL"),
        ("http://h/\x01x", "not a valid http(s) URL: control characters"),
        ("garbage", "not a valid http(s) URL"),
    ],
)
def test_bad_urls(line: str, reason: str) -> None:
    assert parse(f"https://ok/1\n{line}\nhttps://ok/2\n") == [
        Entry("https://ok/1", 1),
        BadLine(2, line, reason, None),
        Entry("https://ok/2", 3),
    ]


# Failures: the entry is not downloaded. Same result on the URL line and on an
# indented line (where the whole rest of the line is the value).
@pytest.mark.parametrize(
    ("option", "reason"),
    [
        ("out=/etc/passwd", "out= must be a relative path inside the store (absolute path)"),
        ("out=../x", "out= must be a relative path inside the store ('..' segment in path)"),
        ("out=a\\b", "out= must be a relative path inside the store (backslash in path)"),
        ("out=C:x", "out= must be a relative path inside the store (absolute path)"),
        ("out=", "out= must be a relative path inside the store (empty path)"),
        ("out=a/", "out= must be a relative path inside the store (path ends with '/')"),
        ("dir=/tmp", "dir= must be a relative path, taken under the store (FILES_STORE) (absolute path)"),
        ("dir=../up", "dir= must be a relative path, taken under the store (FILES_STORE) ('..' segment in path)"),
        ("sha256=abc", "bad sha256 checksum: expected 64 hex digits"),
        (f"sha256={SHA[:-1]}g", "bad sha256 checksum: expected 64 hex digits"),
        (f"md5={SHA}", "bad md5 checksum: expected 32 hex digits"),
        (f"checksum=sha-256={MD5}", "bad sha256 checksum: expected 64 hex digits"),
        (f"checksum=crc32={MD5}", "unsupported checksum algorithm 'crc32'"),
        (f"checksum={SHA}", "checksum= must be <algorithm>=<hex digest>"),
        (f"shake_128={MD5}", "unsupported checksum algorithm 'shake_128'"),
        (f"sha3-256={SHA}", "unknown option 'sha3-256' with a digest as value: not a checksum algorithm fetcher knows"),
        (f"sha265={SHA}", "unknown option 'sha265' with a digest as value: not a checksum algorithm fetcher knows"),
        ("header=NoColon", "header= must be 'Name: value' with a valid header name"),
        ("header=:v", "header= must be 'Name: value' with a valid header name"),
        ("header=Bad(Name):v", "header= must be 'Name: value' with a valid header name"),
        ("split=0", "split= must be a positive integer"),
        ("split=-1", "split= must be a positive integer"),
        ("split=x", "split= must be a positive integer"),
        ("split=", "split= must be a positive integer"),
        ("split=１", "split= must be a positive integer"),
        ("split=1_0", "split= must be a positive integer"),
        ("referer=a\x01b", "control characters in referer="),
        ("user-agent=a\x7fb", "control characters in user-agent="),
        ("header=X:a\x00b", "control characters in header="),
    ],
)
def test_bad_options_inline_and_indented(option: str, reason: str) -> None:
    inline = parse(f"https://h/x  {option}\nhttps://h/y\n")
    indented = parse(f"https://h/x\n\n  # note\n  {option}\n  out=/second-problem\nhttps://h/y\n")
    assert indented == [BadLine(4, option, reason, "https://h/x"), Entry("https://h/y", 6)]
    assert inline == [BadLine(1, f"https://h/x  {option}", reason, "https://h/x"), Entry("https://h/y", 2)]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("https://h/x  out", "expected key=value, got 'out' (values with spaces go on an indented line)"),
        ("https://h/x out=my file.iso", "expected key=value, got 'file.iso' (values with spaces go on an indented line)"),
        ("https://h/x ftp://m/x", "mirror ftp://m/x: unsupported scheme 'ftp'"),
        ("https://h/x\thttp://", "mirror http://: not a valid http(s) URL"),
        ("https://h/x https://ok/x http://h:99999/", "mirror http://h:99999/: not a valid http(s) URL"),
    ],
)
def test_bad_url_line_tokens(line: str, reason: str) -> None:
    assert parse(f"{line}\n  out=o\nhttps://h/y\n") == [BadLine(1, line, reason, "https://h/x"), Entry("https://h/y", 3)]


def test_first_problem_wins() -> None:
    text = f"https://h/x\n  out=a\n  dir=b\n  md5={MD5}\n  sha256=1234\n  out=/c\nhttps://h/y out=y\n"
    assert parse(text) == [
        BadLine(5, "sha256=1234", "bad sha256 checksum: expected 64 hex digits", "https://h/x"),
        Entry("https://h/y", 7, "y"),
    ]
    # An unsafe value is not repaired by a later good one.
    assert parse("https://h/x\n  out=/etc/x\n  out=ok\n") == [
        BadLine(2, "out=/etc/x", "out= must be a relative path inside the store (absolute path)", "https://h/x")
    ]


def test_warnings_survive_on_bad_line() -> None:
    [bad] = parse("https://h/x\n  continue=true\n  out=../x\n")
    assert isinstance(bad, BadLine)
    assert bad.warnings == (ListWarning(2, "continue", "aria2 option 'continue' is not supported by fetcher; ignored"),)


ARIA2_ONLY = [
    "all-proxy", "all-proxy-passwd", "all-proxy-user", "allow-overwrite", "always-resume", "auto-file-renaming",
    "check-integrity", "conditional-get", "connect-timeout", "continue", "dry-run", "file-allocation",
    "force-save", "ftp-passwd", "ftp-user", "gid", "http-accept-gzip", "http-no-cache", "http-passwd",
    "http-proxy", "http-user", "https-proxy", "index-out", "lowest-speed-limit", "max-connection-per-server",
    "max-download-limit", "max-file-not-found", "max-resume-failure-tries", "max-tries", "min-split-size",
    "no-netrc", "no-proxy", "pause", "proxy-method", "remote-time", "retry-wait", "reuse-uri", "select-file",
    "timeout", "uri-selector", "use-head", "bt-tracker", "seed-ratio", "follow-torrent", "metalink-language",
]


@pytest.mark.parametrize("name", ARIA2_ONLY)
def test_aria2_options_fetcher_lacks_are_warnings(name: str) -> None:
    message = f"aria2 option {name!r} is not supported by fetcher; ignored"
    for text, line in [(f"https://h/x\n  {name}=2\n", 2), (f"https://h/x {name}=2\n", 1),
                       (f"https://h/x\n  {name} = a value with spaces\n", 2)]:
        [entry] = parse(text)
        assert entry == Entry("https://h/x", 1)
        assert entry.warnings == (ListWarning(line, name, message),)


@pytest.mark.parametrize(
    ("option", "key", "message"),
    [
        ("foo=bar", "foo", "unknown option 'foo'; ignored"),
        ("ot=x", "ot", "unknown option 'ot'; ignored (did you mean 'out'?)"),
        ("user_agent=x", "user_agent", "unknown option 'user_agent'; ignored (did you mean 'user-agent'?)"),
        ("refferer=x", "refferer", "unknown option 'refferer'; ignored (did you mean 'referer'?)"),
        ("max-trie=3", "max-trie", "unknown option 'max-trie'; ignored (did you mean 'max-tries'?)"),
        ("Foo=bar", "foo", "unknown option 'Foo'; ignored"),
        ("=x", "", "unknown option ''; ignored"),
        ("gid=0123456789abcdef", "gid", "aria2 option 'gid' is not supported by fetcher; ignored"),
        (f"x-digest={MD5[:31]}", "x-digest", "unknown option 'x-digest'; ignored"),
    ],
)
def test_unknown_options_are_warnings(option: str, key: str, message: str) -> None:
    for text, line in [(f"https://h/x {option}\n", 1), (f"https://h/x\n  {option}\n", 2)]:
        [entry] = parse(text)
        assert entry == Entry("https://h/x", 1)
        assert entry.warnings == (ListWarning(line, key, message),)
        assert entry.warnings[0].where == f"line {line}"


def test_indented_line_without_equals_is_a_warning() -> None:
    [entry] = parse("https://h/x\n  out\n  just some words\n")
    assert entry == Entry("https://h/x", 1)
    assert [(w.line, w.option) for w in entry.warnings] == [(2, "<no-equals>"), (3, "<no-equals>")]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["header=X-A: 1"], {"headers": (("X-A", "1"),)}),
        (["header = Authorization: Bearer x y"], {"headers": (("Authorization", "Bearer x y"),)}),
        (["header=X-Empty:", "header=X-Empty2:   "], {"headers": (("X-Empty", ""), ("X-Empty2", ""))}),
        (["header=Cookie: a=1; b=2"], {"headers": (("Cookie", "a=1; b=2"),)}),
        (["header=X-A: 1", "header=x-a: 2", "header=X-B:3"],
         {"headers": (("X-A", "1"), ("x-a", "2"), ("X-B", "3"))}),
        (["referer=https://site/page?a=b c"], {"referer": "https://site/page?a=b c"}),
        (["referer=*"], {"referer": "*"}),
        (["user-agent=Mozilla/5.0 (X11; Linux x86_64)"], {"user_agent": "Mozilla/5.0 (X11; Linux x86_64)"}),
        (["user-agent="], {"user_agent": ""}),
        (["split=5"], {"split": 5}),
        (["split=016"], {"split": 16}),
        (["  out  =  with space.iso  "], {"out": "with space.iso"}),
        (["out=a/b", "dir=d"], {"out": "d/a/b"}),
        (["dir=d"], {"out": "d/x"}),
        (["DIR=d", "OUT=o"], {"out": "d/o"}),
        ([f"checksum = sha-512 = {'ab' * 64}"], {"checksum": Checksum("sha512", "ab" * 64)}),
        ([f"SHA1={'AB' * 20}"], {"checksum": Checksum("sha1", "ab" * 20)}),
    ],
)
def test_indented_options(options: list[str], expected: dict[str, object]) -> None:
    text = "https://h/x\n" + "".join(f"  {o}\n" for o in options)
    [entry] = parse(text)
    assert entry == Entry("https://h/x", 1, **expected)  # type: ignore[arg-type]
    assert entry.warnings == ()
    assert list(parse_lines(entry.to_line().splitlines())) == [entry]


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ("header=X-Token:abc", {"headers": (("X-Token", "abc"),)}),
        ("header=A:1 header=B:2", {"headers": (("A", "1"), ("B", "2"))}),
        ("referer=http://r/ user-agent=ua/1 split=3", {"referer": "http://r/", "user_agent": "ua/1", "split": 3}),
        (f"out=o checksum=SHA-256={SHA}", {"out": "o", "checksum": Checksum("sha256", SHA)}),
        ("dir=d", {"out": "d/x"}),
    ],
)
def test_same_line_options(tokens: str, expected: dict[str, object]) -> None:
    [entry] = parse(f"https://h/x {tokens}\n")
    assert entry == Entry("https://h/x", 1, **expected)  # type: ignore[arg-type]
    assert entry.warnings == ()


@pytest.mark.parametrize(
    ("text", "expected", "warned"),
    [
        ("https://h/x out=a out=b\n", {"out": "b"}, [(1, "out")]),
        ("https://h/x\n  out=a\n  out=b\n", {"out": "b"}, [(3, "out")]),
        ("https://h/x out=a\n  out=b\n", {"out": "b"}, [(2, "out")]),
        ("https://h/x\n  dir=a\n  dir=b\n", {"out": "b/x"}, [(3, "dir")]),
        ("https://h/x\n  split=2\n  split=4\n", {"split": 4}, [(3, "split")]),
        ("https://h/x\n  referer=a\n  referer=b\n", {"referer": "b"}, [(3, "referer")]),
        ("https://h/x\n  user-agent=a\n  user-agent=b\n", {"user_agent": "b"}, [(3, "user-agent")]),
        (f"https://h/x sha256={SHA} md5={MD5}\n", {"checksum": Checksum("md5", MD5)}, [(1, "md5")]),
        (f"https://h/x\n  checksum=md5={MD5}\n  checksum=sha-256={SHA}\n", {"checksum": Checksum("sha256", SHA)},
         [(3, "checksum")]),
        ("https://h/x\n  header=A: 1\n  header=A: 2\n", {"headers": (("A", "1"), ("A", "2"))}, []),
    ],
)
def test_repeated_options_last_wins(text: str, expected: dict[str, object], warned: list[tuple[int, str]]) -> None:
    [entry] = parse(text)
    assert entry == Entry("https://h/x", 1, **expected)  # type: ignore[arg-type]
    assert [(w.line, w.option) for w in entry.warnings] == warned
    assert all("more than once; the last one is used" in w.message for w in entry.warnings)


def test_old_several_options_on_an_indented_line() -> None:
    """aria2 reads the rest of the line as the value: fetcher too, but warns."""
    [entry] = parse(f"https://h/x\n  out=x/a.bin md5={MD5}\n")
    assert entry == Entry("https://h/x", 1, f"x/a.bin md5={MD5}")
    assert entry.warnings == (ListWarning(2, "out", "the value of out= holds 'md5=': an indented line holds "
                                          "one option, its value runs to the end of the line"),)
    # When the value is then invalid, the reason says why.
    [bad] = parse(f"https://h/x\n  md5={MD5}  sha256={SHA}\n")
    assert bad == BadLine(2, f"md5={MD5}  sha256={SHA}", "bad md5 checksum: expected 32 hex digits (an indented "
                          "line holds one option, its value runs to the end of the line)", "https://h/x")
    # Words that are no option names do not warn.
    [entry] = parse("https://h/x\n  header=Cookie: a=1 b=2\n")
    assert entry.warnings == ()


@pytest.mark.parametrize(
    ("line", "url", "mirrors"),
    [
        ("https://a/x\thttps://b/x", "https://a/x", ("https://b/x",)),
        ("https://a/x\thttps://b/x\t\thttp://c:8080/x?q=1\t", "https://a/x", ("https://b/x", "http://c:8080/x?q=1")),
        ("https://a/x https://b/x", "https://a/x", ("https://b/x",)),
        ("https://a/x  out=o  https://b/x?a=1&b=2", "https://a/x", ("https://b/x?a=1&b=2",)),
        ("https://a/x\thttps://a/x", "https://a/x", ("https://a/x",)),  # kept as written
        ("https://a/x referer=http://r/", "https://a/x", ()),  # a URL as a value is no mirror
    ],
)
def test_mirrors(line: str, url: str, mirrors: tuple[str, ...]) -> None:
    [entry] = parse(f"{line}\n")
    assert isinstance(entry, Entry)
    assert (entry.url, entry.mirrors) == (url, mirrors)
    assert entry.urls == (url, *mirrors)
    assert entry.warnings == ()


def test_orphan_options() -> None:
    text = "  out=a\n  out=b\n# c\nftp://x/y\n  out=c\n\n  out=d\nhttps://h/z\n  out=z\n"
    assert parse(text) == [
        BadLine(1, "out=a", "option without a URL above it", None),
        BadLine(4, "ftp://x/y", "unsupported scheme 'ftp'", None),  # out=c and out=d are its own
        Entry("https://h/z", 8, "z"),
    ]


def test_no_deduplication() -> None:
    assert parse("https://h/a\nhttps://h/a\n") == [Entry("https://h/a", 1), Entry("https://h/a", 2)]


def test_lazy_on_infinite_input() -> None:
    consumed = 0

    def lines() -> Iterator[str]:
        nonlocal consumed
        for n in itertools.count():
            consumed += 1
            yield f"https://h/{n}.iso\n"

    first = list(itertools.islice(parse_lines(lines()), 5))
    assert [e.line for e in first] == [1, 2, 3, 4, 5]
    assert consumed == 6  # the sixth URL line closes the fifth entry


def test_entry_yielded_only_when_options_complete() -> None:
    gen = parse_lines(iter(["https://h/a\n", "  out=a\n", "https://h/b\n"]))
    assert next(gen) == Entry("https://h/a", 1, "a")
    assert next(gen) == Entry("https://h/b", 3)


def test_large_list_streams() -> None:
    n = 50_000
    count = sum(1 for _ in parse_lines(f"https://h/{i}\n" for i in range(n)))
    assert count == n


@pytest.mark.parametrize(
    "entry",
    [
        Entry("https://h/a", 1),
        Entry("https://h/a?x=1&y=/#f", 1, "d/out%20file.iso"),
        Entry("https://h/a", 1, "%2e%2e/x", Checksum("sha256", SHA)),
        Entry("http://[::1]:8080/", 1, None, Checksum("md5", MD5)),
        Entry("https://h/a", 1, None, Checksum("blake2b", "ab" * 64)),
        Entry("https://h/a", 1, None, Checksum("sha3_256", SHA)),
        Entry("https://h/a", 1, "with spaces/in name.iso"),
        Entry("https://h/a", 1, mirrors=("https://m/a", "http://n:81/a?b=c")),
        Entry("https://h/a", 1, headers=(("A", "1"), ("A", "2 3"), ("B", ""))),
        Entry("https://h/a", 1, referer="*", user_agent="x y/1", split=16),
        Entry("https://h/a", 1, referer="", user_agent=""),
        Entry("https://h/a", 1, "o", Checksum("sha1", "ab" * 20), ("https://m/a",), (("H", "v"),), "r", "u", 2),
        Entry("https://h/a%20", 1, "d/a "),  # a default name ending in a space: written as dir=
    ],
)
def test_to_line_round_trip(entry: Entry) -> None:
    assert list(parse_lines(entry.to_line().splitlines())) == [entry]
    assert list(parse_lines([line + "\n" for line in entry.to_line().split("\n")])) == [entry]


def test_to_line_format() -> None:
    entry = Entry("https://h/a", 1, "o/x.iso", Checksum("sha256", SHA), ("https://m/a",),
                  (("Authorization", "Bearer x y"), ("X-Empty", "")), "https://r/", "ua 1", 4)
    assert entry.to_line() == (
        "https://h/a\thttps://m/a\n"
        "  out=o/x.iso\n"
        f"  checksum=sha-256={SHA}\n"
        "  header=Authorization: Bearer x y\n"
        "  header=X-Empty:\n"
        "  referer=https://r/\n"
        "  user-agent=ua 1\n"
        "  split=4"
    )
    assert Entry("https://h/a", 1).to_line() == "https://h/a"
    assert Entry("https://h/a", 1, checksum=Checksum("blake2s", SHA)).to_line() == f"https://h/a\n  blake2s={SHA}"


@pytest.mark.parametrize(
    ("algorithm", "written"),
    [("md5", "checksum=md5"), ("sha1", "checksum=sha-1"), ("sha224", "checksum=sha-224"),
     ("sha256", "checksum=sha-256"), ("sha384", "checksum=sha-384"), ("sha512", "checksum=sha-512"),
     ("sha3_512", "sha3_512"), ("blake2b", "blake2b")],
)
def test_to_line_checksum_names(algorithm: str, written: str) -> None:
    digest = hashlib.new(algorithm, b"x").hexdigest()
    entry = Entry("https://h/a", 1, checksum=Checksum(algorithm, digest))
    assert entry.to_line() == f"https://h/a\n  {written}={digest}"
    assert list(parse_lines(entry.to_line().splitlines())) == [entry]


def test_to_line_round_trip_from_parsed() -> None:
    text = (f"https://h/a\n dir=d\n checksum=SHA-1={'AB' * 20}\n  foo=bar\nhttps://h/b out=o\n"
            "https://h/c\thttps://m/c\n  header=A: b c\n  referer=*\n  user-agent=u a\n  split=3\n  continue=true\n"
            "https://h/d%20\n  dir=sub\n")
    entries = [e for e in parse(text) if isinstance(e, Entry)]
    assert len(entries) == 4
    for entry in entries:
        assert list(parse_lines(entry.to_line().splitlines(), first_line=entry.line)) == [entry]
    assert entries[0].to_line() == f"https://h/a\n  out=d/a\n  checksum=sha-1={'ab' * 20}"
    assert entries[0].warnings  # not written back, not compared
    assert entries[3].out == "sub/d "
    assert entries[3].to_line() == "https://h/d%20\n  dir=sub"


@pytest.mark.parametrize(
    "entry",
    [
        Entry("https://h/a b", 1),
        Entry("https://h/a", 1, mirrors=("https://m/a\n",)),
        Entry("https://h/a", 1, mirrors=("not-a-url",)),
        Entry("", 1),
        Entry("https://h/a", 1, "x\ny"),
        Entry("https://h/a", 1, " x"),
        Entry("https://h/a", 1, "x "),  # not the URL's default name: cannot be written
        Entry("https://h/a", 1, referer="a\nb"),
        Entry("https://h/a", 1, user_agent=" padded"),
        Entry("https://h/a", 1, headers=(("Bad Name", "v"),)),
        Entry("https://h/a", 1, headers=(("A", "v\r\nX: y"),)),
        Entry("https://h/a", 1, split=0),
    ],
)
def test_to_line_refuses_what_cannot_be_written(entry: Entry) -> None:
    with pytest.raises(ValueError):
        entry.to_line()


@pytest.mark.parametrize(
    "algorithm",
    ["md5", "sha1", "sha224", "sha256", "sha384", "sha512", "sha3_224", "sha3_256", "sha3_384", "sha3_512",
     "blake2b", "blake2s"],
)
def test_parse_checksum_hashlib_names(algorithm: str) -> None:
    digest = hashlib.new(algorithm, b"x").hexdigest()
    assert parse_checksum(algorithm, digest.upper()) == Checksum(algorithm, digest)
    assert str(parse_checksum(algorithm, digest)) == f"{algorithm}={digest}"
    with pytest.raises(ValueError, match=f"bad {algorithm} checksum"):
        parse_checksum(algorithm, digest + "0")


@pytest.mark.parametrize(
    ("aria2", "name"),
    [("sha-1", "sha1"), ("sha-224", "sha224"), ("sha-256", "sha256"), ("sha-384", "sha384"), ("sha-512", "sha512"),
     ("md5", "md5"), ("SHA-256", "sha256")],
)
def test_parse_checksum_aria2_spelling(aria2: str, name: str) -> None:
    digest = hashlib.new(name, b"x").hexdigest()
    assert parse_checksum("checksum", f"{aria2}={digest}") == Checksum(name, digest)


def test_parse_checksum_rejects_non_hex() -> None:
    for value in ["0x" + SHA[2:], " " + SHA[1:], SHA[:-1] + "_", "٠" * 64]:
        with pytest.raises(ValueError, match="expected 64 hex digits"):
            parse_checksum("sha256", value)


def test_parse_inline() -> None:
    text = "  https://h/a\thttps://h/b?x=1  ftp://h/c\nnot-a-url https://h/a "
    result = list(parse_inline(text))
    assert result == [
        Entry("https://h/a", 1),
        Entry("https://h/b?x=1", 2),
        BadLine(3, "ftp://h/c", "unsupported scheme 'ftp'", None),
        BadLine(4, "not-a-url", "not a valid http(s) URL", None),
        Entry("https://h/a", 5),
    ]
    assert [r.where for r in result] == ["URL 1", "URL 2", "URL 3", "URL 4", "URL 5"]
    assert all(r.inline for r in result)
    assert list(parse_inline("   ")) == []


def test_where() -> None:
    assert [r.where for r in parse("https://h/a\nftp://x\n")] == ["line 1", "line 2"]
    assert Entry("https://h/a", 0).where == ""
    assert BadLine(7, "x", "r", None).where == "line 7"
    assert BadLine(7, "x", "r", None, inline=True).where == "URL 7"
    assert ListWarning(3, "foo", "m").where == "line 3"


@pytest.mark.parametrize(
    "url",
    ["https://h", "HTTP://H:80/a/../b", "https://[fe80::1%25eth0]/x", "http://h/%zz", "http://u:p@h:1/x?y#z",
     "http://h:0/", "http://h:/x", "https://h./", "http://h:65536/", "http://[]/", "http://u@/", "http:h/x",
     "https:/h/x", "http://h:8a/", "http://[::1]x/"],
)
def test_entries_are_exactly_the_nameable_urls(url: str) -> None:
    [result] = parse_inline(url)
    try:
        url_to_path(url)
    except ValueError:
        assert isinstance(result, BadLine)
    else:
        assert result == Entry(url, 1)


ARIA2_MANUAL = f"""\
http://server/file.iso http://mirror/file.iso
  dir=/iso_images
  out=file.img
http://foo/bar
https://example.org/file
  dir=/tmp
  out=foo
https://example.org/iso\thttps://mirror.example.org/iso
  out=debian.iso
  checksum=sha-1={'ab' * 20}
  header=Accept: */*
  header=X-Token: secret value
  split=5
  max-connection-per-server=2
"""


def test_aria2_manual_examples() -> None:
    result = parse(ARIA2_MANUAL)
    absolute = "dir= must be a relative path, taken under the store (FILES_STORE) (absolute path)"
    assert result == [
        BadLine(2, "dir=/iso_images", absolute, "http://server/file.iso"),
        Entry("http://foo/bar", 4),
        BadLine(6, "dir=/tmp", absolute, "https://example.org/file"),
        Entry("https://example.org/iso", 8, "debian.iso", Checksum("sha1", "ab" * 20),
              mirrors=("https://mirror.example.org/iso",), headers=(("Accept", "*/*"), ("X-Token", "secret value")),
              split=5),
    ]
    assert result[-1].warnings == (
        ListWarning(14, "max-connection-per-server",
                    "aria2 option 'max-connection-per-server' is not supported by fetcher; ignored"),
    )
    # Without the absolute dir=, the first example downloads, with its mirror.
    [first, second] = parse(ARIA2_MANUAL.replace("dir=/iso_images", "dir=iso_images").split("https://example")[0])
    assert first == Entry("http://server/file.iso", 1, "iso_images/file.img", mirrors=("http://mirror/file.iso",))
    assert second == Entry("http://foo/bar", 4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # below an entry: the entry keeps its options, the URL gets its own entry
        ("https://h/a\n  out=a\n  https://h/b\n  out=b\n", [Entry("https://h/a", 1, "a"), Entry("https://h/b", 3, "b")]),
        # the entry above is complete and unaffected even if it has no options
        ("https://h/a\n\thttps://h/b  out=b https://m/b\n",
         [Entry("https://h/a", 1), Entry("https://h/b", 2, "b", mirrors=("https://m/b",))]),
        # with no entry above
        ("  https://h/b\n", [Entry("https://h/b", 1)]),
        ("  out=x\n  https://h/b\n  out=b\n",
         [BadLine(1, "out=x", "option without a URL above it", None), Entry("https://h/b", 2, "b")]),
        # a bad indented URL is a bad line of its own (with its options), not the problem of the entry above
        ("https://h/a\n  out=a\n  ftp://h/b\n  out=b\n",
         [Entry("https://h/a", 1, "a"), BadLine(3, "ftp://h/b", "unsupported scheme 'ftp'", None)]),
        # a URL with "=" in it is still a URL
        ("https://h/a\n  http://h/b?x=1\n", [Entry("https://h/a", 1), Entry("http://h/b?x=1", 2)]),
        # an option whose value is a URL is an option
        ("https://h/a\n  referer=http://r/\n  header=Link: <http://l/>\n",
         [Entry("https://h/a", 1, referer="http://r/", headers=(("Link", "<http://l/>"),))]),
    ],
)
def test_indented_urls_are_entries(text: str, expected: list[Entry | BadLine]) -> None:
    result = parse(text)
    assert result == expected
    for record in result:
        raw = text.splitlines()[record.line - 1]
        first = raw.split()[0]
        if raw.startswith((" ", "\t")) and "://" in first.partition("=")[0]:
            assert [w.option for w in record.warnings] == ["<indented-url>"]
            assert "indented" in record.warnings[0].message
        else:
            assert all(w.option != "<indented-url>" for w in record.warnings)


def test_every_url_gets_a_record() -> None:
    text = "https://h/1\n  https://h/2\n\thttps://h/3 out=/bad\n   ftp://h/4\nhttps://h/5 foo=x\n  http://\n"
    result = parse(text)
    assert [r.line for r in result] == [1, 2, 3, 4, 5, 6]
    assert [type(r).__name__ for r in result] == ["Entry", "Entry", "BadLine", "BadLine", "Entry", "BadLine"]


LIST_BYTES = "\ufeffhttps://h/a\n  out=é.iso\r\n".encode() + b"https://h/b\n  out=b\xff\n ftp://x\n"


def _parsed(lines: Iterable[str]) -> list[Entry | BadLine]:
    return list(parse_lines(lines))


EXPECTED = [Entry("https://h/a", 1, "é.iso"), Entry("https://h/b", 3, "b\ufffd"),
            BadLine(5, "ftp://x", "unsupported scheme 'ftp'", None)]


@pytest.mark.parametrize(
    ("name", "compress"),
    [("list.txt", False), ("list.txt.gz", True), ("list.GZ", True), ("list.txt", True), ("list", True),
     ("list", False)],
)
def test_open_list(tmp_path: Path, name: str, compress: bool) -> None:
    path = tmp_path / name
    path.write_bytes(gzip.compress(LIST_BYTES) if compress else LIST_BYTES)
    with open_list(path) as f:
        assert _parsed(f) == EXPECTED
    with open_list(str(path)) as f:
        assert f.read().startswith("\ufeffhttps://h/a\n")


def test_open_list_multi_member_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "l.gz"
    path.write_bytes(gzip.compress(b"https://h/a\n") + gzip.compress(b"https://h/b\n"))
    with open_list(path) as f:
        assert [e.url for e in parse_lines(f) if isinstance(e, Entry)] == ["https://h/a", "https://h/b"]
    for data in (b"", b"\x1f", b"h"):
        (tmp_path / "e").write_bytes(data)
        with open_list(tmp_path / "e") as f:
            assert f.read() == data.decode("utf-8", "replace")
    (tmp_path / "e.gz").write_bytes(gzip.compress(b""))
    with open_list(tmp_path / "e.gz") as f:
        assert f.read() == ""


def test_open_list_bad_gzip_is_an_oserror(tmp_path: Path) -> None:
    plain_named_gz = tmp_path / "plain.gz"
    plain_named_gz.write_bytes(b"https://h/a\n")
    truncated = tmp_path / "truncated"
    truncated.write_bytes(gzip.compress(b"https://h/a\n" * 10_000)[:-100])
    corrupt = tmp_path / "corrupt"
    data = bytearray(gzip.compress(os.urandom(5000)))
    data[100:110] = b"\0" * 10
    corrupt.write_bytes(bytes(data))
    for path in (plain_named_gz, truncated, corrupt):
        with pytest.raises(OSError), open_list(path) as f:
            for _ in f:
                pass


def test_open_list_closes_the_file(tmp_path: Path) -> None:
    for data in (b"https://h/a\n", gzip.compress(b"https://h/a\n")):
        path = tmp_path / "l"
        path.write_bytes(data)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            with open_list(path) as f:
                f.readline()
        assert len(os.listdir("/proc/self/fd")) == before


class _Trickle(io.RawIOBase):
    """A stream with no peek, handing out one byte per read."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._data:
            return 0
        buffer[0] = self._data[0]
        self._data = self._data[1:]
        return 1


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "make",
    [io.BytesIO, lambda d: io.BufferedReader(io.BytesIO(d)), _Trickle, lambda d: io.BufferedReader(_Trickle(d), 1)],
    ids=["BytesIO", "buffered", "trickle", "buffered-trickle"],
)
def test_text_lines(compress: bool, make: Callable[[bytes], IO[bytes]]) -> None:
    stream = make(gzip.compress(LIST_BYTES) if compress else LIST_BYTES)
    assert _parsed(text_lines(stream)) == EXPECTED
    assert not stream.closed  # the caller's stream is left open
    stream.close()


def test_text_lines_empty_and_short() -> None:
    assert list(text_lines(io.BytesIO(b""))) == []
    assert list(text_lines(io.BytesIO(b"a"))) == ["a"]
    assert list(text_lines(io.BufferedReader(io.BytesIO(b"\x1f")))) == ["\x1f"]


def test_text_lines_peeks_without_consuming() -> None:
    stream = io.BufferedReader(io.BytesIO(b"https://h/a\nhttps://h/b\n"))
    lines = text_lines(stream)
    assert next(lines) == "https://h/a\n"
    lines.close()
    assert not stream.closed


def test_text_lines_streams_a_pipe() -> None:
    """Each line is available as soon as it is written, as the spider needs for stdin."""
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb") as reader, os.fdopen(write_fd, "wb", buffering=0) as writer:
        lines = text_lines(reader)
        writer.write(b"https://h/1\n")
        got = []
        done = threading.Event()

        def consume() -> None:
            got.append(next(lines))
            done.set()

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        assert done.wait(5), "the first line should not wait for more input"
        assert got == ["https://h/1\n"]
        writer.write(b"https://h/2\n")
        writer.close()
        assert list(lines) == ["https://h/2\n"]
        thread.join()


def test_text_lines_bad_gzip_is_an_oserror() -> None:
    with pytest.raises(OSError):
        list(text_lines(io.BytesIO(gzip.compress(b"https://h/a\n" * 1000)[:-20])))


def test_aria2_fixture_shapes() -> None:
    """The shapes of aria2's own input-file test fixtures: TAB-separated mirrors with indented
    out=/dir= (an absolute dir= stays refused, clearly), plain URL lines, blank lines."""
    text = ("http://one.test/f\thttp://two.test/f\thttp://three.test/f\n  out=mine.out\n  dir=/abs\n"
            "http://four.test/f.iso\n\n"
            "http://one.test/g\thttp://two.test/g\n  out=g.out\n  dir=rel\n")
    parsed = list(parse_lines(text.splitlines(True)))
    assert [type(p).__name__ for p in parsed] == ["BadLine", "Entry", "Entry"]
    assert "dir= must be a relative path" in parsed[0].reason and parsed[0].url == "http://one.test/f"
    assert parsed[1].url == "http://four.test/f.iso" and parsed[1].mirrors == ()
    assert parsed[2].mirrors == ("http://two.test/g",) and parsed[2].out == "rel/g.out"


# A refused entry keeps its options: one BadLine per bad entry.

ARIA2_FILELIST1 = (  # aria2's own input-file fixture test/filelist1.txt
    "http://localhost/index.html\thttp://localhost2/index.html\n\nftp://localhost/aria2.tar.bz2\n"
    "  dir=/tmp\n  out=chunky_chocolate\n"
)


def test_aria2_filelist1() -> None:
    assert parse(ARIA2_FILELIST1) == [
        Entry("http://localhost/index.html", 1, mirrors=("http://localhost2/index.html",)),
        BadLine(3, "ftp://localhost/aria2.tar.bz2", "unsupported scheme 'ftp'", None),
    ]


@pytest.mark.parametrize(
    "line",
    ["ftp://h/x", "garbage", "http://", "http://h:99999/x", "https://h/\x01x", "  ftp://h/indented",
     "https://h/x out=/abs", "https://h/x ftp://m/x", "https://h/x bare", f"https://h/{'a' * MAX_LINE}",
     f"  https://h/{'a' * MAX_LINE}"],
    ids=lambda line: repr(line[:30]),
)
def test_one_bad_line_per_refused_entry(line: str) -> None:
    text = f"{line}\n  out=a\n\n  # c\n  header=A: b\n  no equals\n  continue=1\n  out=/abs\nhttps://h/next\n  out=n\n"
    bad, entry = parse(text)
    assert isinstance(bad, BadLine)
    assert bad.line == 1
    assert entry == Entry("https://h/next", 9, "n")
    # The options below a refused line are not read: no warnings from them either.
    assert [w.option for w in bad.warnings] == (["<indented-url>"] if line.startswith(" ") else [])
    assert list(parse_text(text)) == [bad, entry]


# Lines end at "\n" (or "\r\n") only, however the list is read.

LINE_ENDS_OF_SPLITLINES = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r"]


@pytest.mark.parametrize("sep", LINE_ENDS_OF_SPLITLINES, ids=ascii)
def test_lines_end_only_at_newline(tmp_path: Path, sep: str) -> None:
    text = (f"https://h/x\n  user-agent=Mozilla{sep}  out=elsewhere/x.bin\r\n  referer=r{sep}\n"
            f"https://h/y{sep}  out=y\n# a comment{sep}https://h/z\n")
    expected = list(parse_lines(text.split("\n")))  # what the enqueuer reads from these lines
    assert list(parse_text(text)) == expected
    for data in (text.encode(), gzip.compress(text.encode())):
        (tmp_path / "list").write_bytes(data)
        with open_list(tmp_path / "list") as f:
            assert list(parse_lines(f)) == expected
        assert list(parse_lines(text_lines(io.BytesIO(data)))) == expected
        assert list(parse_lines(text_lines(_Trickle(data)))) == expected
    first, second = expected
    assert second == Entry("https://h/y", 4, "y")  # whitespace on the URL line: a same-line option
    if sep in "\u2028\u2029\x85":
        assert first == Entry("https://h/x", 1, user_agent=f"Mozilla{sep}  out=elsewhere/x.bin", referer="r")
        # The queue carries Entry.to_line(); the worker reads back exactly that entry, no out=.
        assert list(parse_text(first.to_line())) == [first]
    else:  # a control character inside the value, where splitlines saw a line end
        assert first == BadLine(2, f"user-agent=Mozilla{sep}  out=elsewhere/x.bin",
                                "control characters in user-agent= (an indented line holds one option, its value "
                                "runs to the end of the line)", "https://h/x")


def test_line_ends_removed_by_parse_lines() -> None:
    """"\n" or "\r\n" ends a line; a lone "\r" is part of it (a control character in a value)."""
    assert list(parse_lines(["https://h/x\r\n", "  referer=a\rb\r\n", "https://h/y\n"])) == [
        BadLine(2, "referer=a\rb", "control characters in referer=", "https://h/x"), Entry("https://h/y", 3)]
    assert list(parse_text("https://h/x\r\n  referer=a\rb\r\nhttps://h/y")) == [
        BadLine(2, "referer=a\rb", "control characters in referer=", "https://h/x"), Entry("https://h/y", 3)]
    assert list(parse_text("")) == []
    assert list(parse_text("https://h/x")) == [Entry("https://h/x", 1)]


# Limits: MAX_LINE characters per line, MAX_OPTIONS options per entry.


def test_limit_defaults() -> None:
    assert (MAX_LINE, MAX_OPTIONS) == (65_536, 1000)
    url = "https://h/" + "a" * (MAX_LINE - 10)
    assert parse(f"{url}\r\n") == [Entry(url, 1)]  # the line end is not counted
    [bad] = parse(f"{url}a\n")
    assert bad == BadLine(1, f"{url[:100]}...", "line of 65,537 characters is over the 65,536 limit", None)
    headers = "".join(f"  header=H{i}: v\n" for i in range(MAX_OPTIONS))
    [entry] = parse(f"https://h/x\n{headers}")
    assert isinstance(entry, Entry) and len(entry.headers) == MAX_OPTIONS
    [bad] = parse(f"https://h/x out=o\n{headers}")
    assert bad == BadLine(MAX_OPTIONS + 1, "header=H999: v", "entry of 1,001 options is over the 1,000 limit",
                          "https://h/x")


def test_line_limit() -> None:
    def run(text: str) -> list[Entry | BadLine]:
        result = list(parse_text(text, max_line=20))
        assert list(parse_lines(text.splitlines(True), max_line=20)) == result
        return result

    over = "line of 21 characters is over the 20 limit"
    at_limit, one_over = "https://h/" + "a" * 10, "https://h/" + "b" * 11
    assert run(f"{at_limit}\r\n  out=x\n") == [Entry(at_limit, 1, "x")]
    # an over-long URL line: refused with its options, the list goes on
    assert run(f"{one_over}\n  out=x\n  {'o' * 30}\nhttps://h/c\n") == [
        BadLine(1, f"{one_over[:20]}...", over, None), Entry("https://h/c", 4)]
    # an over-long option line refuses its entry
    assert run(f"https://h/a\n  out=x\n  header=X: {'v' * 9}\n  out=y\nhttps://h/c\n") == [
        BadLine(3, "header=X: vvvvvvvv...", over, "https://h/a"), Entry("https://h/c", 5)]
    # an over-long line that holds only spaces as far as it is read: not blank
    assert run(f"https://h/a\n{' ' * 21}\nhttps://h/c\n") == [
        BadLine(2, "...", over, "https://h/a"), Entry("https://h/c", 3)]
    assert run(f"  {'o' * 19}\n  out=x\nhttps://h/c\n") == [
        BadLine(1, f"{'o' * 18}...", "option without a URL above it", None), Entry("https://h/c", 3)]
    # a comment is ignored whatever its length
    assert run(f"# {'c' * 100}\nhttps://h/a\n  # {'c' * 100}\n  out=x\n") == [Entry("https://h/a", 2, "x")]


def test_options_limit() -> None:
    def run(text: str) -> list[Entry | BadLine]:
        return list(parse_text(text, max_options=3))

    three = "https://h/a header=A:1 header=B:2\n  header=C: 3\n"
    assert run(three) == [Entry("https://h/a", 1, headers=(("A", "1"), ("B", "2"), ("C", "3")))]
    # counted: same-line options and option lines, one without "=" too (not blank lines, comments, mirrors)
    assert run(f"{three}  header=D: 4\n\n  # c\n  no equals\n  header=E: 5\nhttps://h/b\n") == [
        BadLine(3, "header=D: 4", "entry of 6 options is over the 3 limit", "https://h/a"), Entry("https://h/b", 8)]
    assert run("https://h/a header=A:1 header=B:2 header=C:3 https://m/a header=D:4\n") == [
        BadLine(1, "https://h/a header=A:1 header=B:2 header=C:3 https://m/a header=D:4",
                "entry of 4 options is over the 3 limit", "https://h/a")]
    # the first problem is the one reported
    assert run("https://h/a\n  out=/x\n  a=1\n  b=2\n  c=3\n") == [
        BadLine(2, "out=/x", "out= must be a relative path inside the store (absolute path)", "https://h/a")]
    [bad] = run("https://h/a\n  continue=1\n  foo=1\n  bar=1\n  baz=1\n  qux=1\n")
    assert [w.option for w in bad.warnings] == ["continue", "foo", "bar"]  # none kept past the limit


def test_what_is_accepted_reads_back_under_the_same_limit() -> None:
    """The queue carries Entry.to_line(): the worker, with the enqueuer's limits, reads back the same entry.
    An entry that to_line would write with a line over the limit (dir= and out= joined, "  " and ": "
    added) is refused when the list is read, not later by the worker."""
    text = (f"https://h/a\n  dir={'d' * 20}\n  out={'o' * 20}\n"
            f"https://h/b\n header=A:{'v' * 19}\n"
            "https://h/c\n  out=x\n")
    assert list(parse_text(text, max_line=30)) == [
        BadLine(1, "https://h/a", "written back (the queue, failed.txt), a line of 47 characters is over the 30 "
                "limit", "https://h/a"),
        BadLine(4, "https://h/b", "written back (the queue, failed.txt), a line of 31 characters is over the 30 "
                "limit", "https://h/b"),
        Entry("https://h/c", 6, "x"),
    ]
    for n in range(30):
        text = (f"https://h/{'u' * n} https://m/\n dir={'d' * n}\n out={'o' * n}\n"
                f"https://h/x\n header=A:{'v' * n}\n referer={'r' * n}\n user-agent={'a' * n}\n\tsplit=01\n")
        for entry in parse_text(text, max_line=30):
            if isinstance(entry, Entry):
                assert list(parse_text(entry.to_line(), max_line=30)) == [dataclasses.replace(entry, line=1)]


def _limit_cases(limit: int) -> str:
    url = "https://h/"
    lines = [
        url + "a" * (limit - 10) + "\n",  # at the limit
        url + "b" * (limit - 10) + "\r\n",  # at the limit: the reader reads limit+1, cutting "\r\n"
        url + "c" * (limit - 9) + "\n",  # one over
        "  out=" + "o" * (limit - 5) + "\r\n",  # an over-long option of the refused entry above
        url + "d\n",
        "  out=" + "o" * (limit - 5) + "\n",  # an option over the limit refuses the entry
        url + "e\n",
        # read on by 64 KiB chunks: a "\r\n" across two of them, and near their ends
        *(url + "f" * (limit - 10 + 65_536 + n) + "\r\n" for n in range(-2, 3)),
        "\ufeff" + url + "g" * 300_000 + "\n",  # a BOM is no BOM after the first line
        url + "h" * (limit + 1),  # over, at the end without a line end
    ]
    return "".join(lines)


@pytest.mark.parametrize("limit", [16, 200])
@pytest.mark.parametrize("compress", [False, True])
def test_readers_cut_long_lines_as_parse_text_does(tmp_path: Path, limit: int, compress: bool) -> None:
    text = _limit_cases(limit)
    expected = list(parse_text(text, max_line=limit))

    def over(length: int) -> str:
        return f"line of {length:,} characters is over the {limit:,} limit"

    assert [(r.line, r.reason if isinstance(r, BadLine) else "") for r in expected] == [
        (1, ""), (2, ""), (3, over(limit + 1)), (6, over(limit + 1)), (7, ""),
        *((8 + i, over(limit + 65_536 + n)) for i, n in enumerate(range(-2, 3))),
        (13, over(300_011)), (14, over(limit + 11)),
    ]
    data = gzip.compress(text.encode()) if compress else text.encode()
    (tmp_path / "list").write_bytes(data)
    with open_list(tmp_path / "list", max_line=limit) as f:
        assert list(parse_lines(f, max_line=limit)) == expected
    for stream in (io.BytesIO(data), io.BufferedReader(io.BytesIO(data), 7)):
        assert list(parse_lines(text_lines(stream, max_line=limit), max_line=limit)) == expected


_MEASURE = """
import json, sys, tracemalloc
from fetcher.listing.urllist import open_list, parse_lines, text_lines

def header_lines(n):
    yield "https://h/a\\n"
    for _ in range(n):
        yield "  header=Authorization: Bearer x\\n"
    yield "https://h/b\\n"

tracemalloc.start()
source = sys.argv[1]
if source == "-":
    records = list(parse_lines(text_lines(sys.stdin.buffer)))
elif source.isdigit():
    records = list(parse_lines(header_lines(int(source))))
else:
    with open_list(source) as f:
        records = list(parse_lines(f))
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps([peak, [[type(r).__name__, r.line, r.url, getattr(r, "reason", "")] for r in records]]))
"""


def _measure(source: str, stdin: Path | None = None) -> tuple[int, list[list[object]]]:
    """Peak traced memory (bytes) of parsing a list in a fresh interpreter, and what came out."""
    with open(stdin or os.devnull, "rb") as f:
        out = subprocess.run([sys.executable, "-c", _MEASURE, source], stdin=f, capture_output=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent).stdout
    peak, records = json.loads(out)
    return peak, records


@pytest.fixture(scope="module")
def huge_line_lists(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """A 50 MiB URL line with an option, then an entry: plain and gzip."""
    data = b"https://h/" + b"a" * (50 * 2**20 - 10) + b"\n  out=x\nhttps://h/next\n"
    paths = {}
    for compress in (False, True):
        paths[compress] = tmp_path_factory.mktemp("huge") / ("list.gz" if compress else "list")
        paths[compress].write_bytes(gzip.compress(data, 1) if compress else data)
    return paths


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("via", ["open_list", "text_lines"])
def test_huge_line_memory_bounded(huge_line_lists: dict[bool, Path], compress: bool, via: str) -> None:
    path = huge_line_lists[compress]
    peak, records = _measure("-", path) if via == "text_lines" else _measure(str(path))
    assert records == [["BadLine", 1, None, "line of 52,428,800 characters is over the 65,536 limit"],
                       ["Entry", 3, "https://h/next", ""]]
    print(f"peak {peak:,} bytes for a 52,428,800-character line ({via}, gzip={compress})")
    assert peak < 2 * 2**20  # the line is 50 MiB


@pytest.mark.parametrize("n", [250_000, pytest.param(4_000_000, marks=pytest.mark.slow)])
def test_option_lines_memory_bounded(n: int) -> None:
    peak, records = _measure(str(n))
    assert records == [["BadLine", 1002, "https://h/a", f"entry of {n:,} options is over the 1,000 limit"],
                       ["Entry", n + 2, "https://h/b", ""]]
    print(f"peak {peak:,} bytes for {n:,} header= lines")
    assert peak < 2**20
