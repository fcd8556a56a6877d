"""The URL list format: entries, options, bad lines, laziness, round trips."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator

import pytest

from fetcher.naming import url_to_path
from fetcher.urllist import BadLine, Checksum, Entry, parse_checksum, parse_inline, parse_lines

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
        "  out=x/a.bin md5=" + MD5 + "\r\n"
        "https://h/b?q=1#frag\r\n"
        " dir=d\r\n"
        "https://h/\n"
        " dir=d//e\n"
    )
    assert parse(text) == [
        Entry("https://h/a", 1, "downloads/x/a.bin", Checksum("md5", MD5)),
        Entry("https://h/b?q=1#frag", 7, "d/b?q=1"),
        Entry("https://h/", 9, "d/e/index.html"),
    ]


def test_first_line_and_bom_only_on_first_line() -> None:
    assert list(parse_lines(["https://h/a"], first_line=10)) == [Entry("https://h/a", 10)]
    # A BOM elsewhere is no BOM: the line is not a URL.
    assert list(parse_lines(["https://h/a", "\ufeffhttps://h/b"]))[1] == BadLine(
        2, "\ufeffhttps://h/b", "not a valid http(s) URL", None
    )


def test_url_kept_as_written() -> None:
    url = "HTTPS://Host.example:443/a/../%7Euser/x%2fy?b=2&a=1#part"
    assert parse(f"  \t{url}  \n") == [BadLine(1, url, "option without a URL above it", None)]
    assert parse(f"{url}   \n") == [Entry(url, 1)]


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


@pytest.mark.parametrize(
    ("option", "reason"),
    [
        ("foo=bar", "unknown option 'foo'"),
        ("referer=http://x/", "unknown option 'referer'"),
        ("out", "expected key=value, got 'out'"),
        ("out=/etc/passwd", "out= must be a relative path inside the store (absolute path)"),
        ("out=../x", "out= must be a relative path inside the store ('..' segment in path)"),
        ("out=a\\b", "out= must be a relative path inside the store (backslash in path)"),
        ("out=C:x", "out= must be a relative path inside the store (absolute path)"),
        ("out=", "out= must be a relative path inside the store (empty path)"),
        ("dir=/tmp", "dir= must be a relative path inside the store (absolute path)"),
        ("sha256=abc", "bad sha256 checksum: expected 64 hex digits"),
        (f"sha256={SHA[:-1]}g", "bad sha256 checksum: expected 64 hex digits"),
        (f"md5={SHA}", "bad md5 checksum: expected 32 hex digits"),
        (f"checksum=sha-256={MD5}", "bad sha256 checksum: expected 64 hex digits"),
        (f"checksum=crc32={MD5}", "unsupported checksum algorithm 'crc32'"),
        (f"checksum={SHA}", "checksum= must be <algorithm>=<hex digest>"),
        (f"shake_128={MD5}", "unknown option 'shake_128'"),
        ("https://mirror/x", "a URL on an indented line (indented lines hold options)"),
        ("out=a out=b", "duplicate option 'out'"),
        (f"sha256={SHA} md5={MD5}", "more than one checksum"),
    ],
)
def test_bad_options_inline_and_indented(option: str, reason: str) -> None:
    inline = parse(f"https://h/x  {option}\nhttps://h/y\n")
    indented = parse(f"https://h/x\n\n  # note\n  {option}\n  foo=second-problem\nhttps://h/y\n")
    assert indented == [BadLine(4, option, reason, "https://h/x"), Entry("https://h/y", 6)]
    if "://" not in option:
        assert inline == [BadLine(1, f"https://h/x  {option}", reason, "https://h/x"), Entry("https://h/y", 2)]


def test_bad_option_after_good_ones() -> None:
    text = f"https://h/x\n  out=a dir=b\n  md5={MD5}  sha256=1234\n  out=c\nhttps://h/y out=y\n"
    assert parse(text) == [
        BadLine(3, f"md5={MD5}  sha256=1234", "bad sha256 checksum: expected 64 hex digits", "https://h/x"),
        Entry("https://h/y", 5, "y"),
    ]


def test_mirrors() -> None:
    line = "https://a/x\thttps://b/x"
    assert parse(f"{line}\n  out=o\nhttps://c/x\n") == [
        BadLine(1, line, "several URLs on one line (mirrors) are not supported", "https://a/x"),
        Entry("https://c/x", 3),
    ]


def test_orphan_options() -> None:
    text = "  out=a\n  out=b\n# c\nftp://x/y\n  out=c\n\n  out=d\nhttps://h/z\n  out=z\n"
    assert parse(text) == [
        BadLine(1, "out=a", "option without a URL above it", None),
        BadLine(4, "ftp://x/y", "unsupported scheme 'ftp'", None),
        BadLine(5, "out=c", "option without a URL above it", None),
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
    ],
)
def test_to_line_round_trip(entry: Entry) -> None:
    assert list(parse_lines([entry.to_line()])) == [entry]


def test_to_line_round_trip_from_parsed() -> None:
    text = f"https://h/a\n dir=d\n checksum=SHA-1={'AB' * 20}\nhttps://h/b out=o\n"
    for entry in parse(text):
        assert isinstance(entry, Entry)
        assert list(parse_lines([entry.to_line()], first_line=entry.line)) == [entry]
    assert parse(text)[0].to_line() == f"https://h/a  out=d/a  sha1={'ab' * 20}"


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
    assert list(parse_inline(text)) == [
        Entry("https://h/a", 1),
        Entry("https://h/b?x=1", 2),
        BadLine(3, "ftp://h/c", "unsupported scheme 'ftp'", None),
        BadLine(4, "not-a-url", "not a valid http(s) URL", None),
        Entry("https://h/a", 5),
    ]
    assert list(parse_inline("   ")) == []


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
