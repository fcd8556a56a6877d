"""Names in the store: readable, collision-free, never outside the store."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

import pytest

from fetcher.store.naming import resolve_in_store, safe_relpath, url_to_path


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("http://Example.COM", "example.com/index.html"),
        ("https://example.com/", "example.com/index.html"),
        ("https://example.com/a/file.iso", "example.com/a/file.iso"),
        ("https://example.com/a/", "example.com/a/index.html"),
        ("http://h:80/x", "h/x"),
        ("https://h:443/x", "h/x"),
        ("http://h:443/x", "h:443/x"),
        ("https://h:8443/x", "h:8443/x"),
        ("http://[::1]/x", "[::1]/x"),
        ("http://[::1]:8080/x", "[::1]:8080/x"),
        ("http://[2001:DB8::1]:80/x", "[2001:db8::1]/x"),
        ("http://user:pw@h/x", "h/x"),
        ("http://h/x#frag", "h/x"),
        ("http://h/caf%C3%A9.txt", "h/café.txt"),
        ("http://h/café.txt", "h/café.txt"),
        ("http://h/a%20b", "h/a b"),
        ("http://h/%FF%fe", "h/%FF%FE"),
        ("http://h/a%3Fb", "h/a%3Fb"),
        ("http://h/a?b", "h/a?b"),
        ("http://h/a%2Fb", "h/a%2Fb"),
        ("http://h/a%5cb", "h/a%5Cb"),
        ("http://h/a\\b", "h/a%5Cb"),
        ("http://h/a%25b", "h/a%25b"),
        ("http://h/%252e", "h/%252e"),
        ("http://h/a%zz", "h/a%%zz"),
        ("http://h/a%00b%0a%7f", "h/a%00b%0A%7F"),
        ("http://h/.", "h/%2E"),
        ("http://h/..", "h/%2E%2E"),
        ("http://h/a/../b", "h/a/%2E%2E/b"),
        ("http://h/%2e%2e/x", "h/%2E%2E/x"),
        ("http://h/%2E%2e/", "h/%2E%2E/index.html"),
        ("http://h/..%2f..%2fetc/passwd", "h/..%2F..%2Fetc/passwd"),
        ("http://h/a//b", "h/a/%/b"),
        ("http://h//a", "h/%/a"),
        ("http://h/?q=1", "h/index.html?q=1"),
        ("http://h/f.iso?a=1&b=x/y\\z", "h/f.iso?a=1&b=x%2Fy%5Cz"),
        ("http://h/f?x=%2F", "h/f?x=%252F"),
        ("http://h/f?x=%2f%20%", "h/f?x=%2f%20%"),
        ("http://h/..?x", "h/%2E%2E?x"),
        ("http://../x", "%2E%2E/x"),
        ("http://A%2Fb/x", "a%252fb/x"),
        ("http://a\\b/c", "a%5Cb/c"),
    ],
)
def test_url_to_path(url: str, name: str) -> None:
    assert url_to_path(url) == name


@pytest.mark.parametrize(
    "url", ["ftp://h/x", "file:///etc/passwd", "h/x", "http:///x", "http://:80/x", "http://h:99999/", "http://[::1/",
            "http://[::1]x/", "http://u@[::1]]/", "http://h:8a/"]
)
def test_url_to_path_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        url_to_path(url)


def _assert_safe(name: str) -> None:
    assert not name.startswith("/")
    for part in name.split("/"):
        assert part not in ("", ".", "..")
        assert len(part.encode("utf-8", "surrogatepass")) <= 255
        assert not re.search(r"[\x00-\x1f\x7f\\]", part)


HOSTILE = [
    "http://h/..",
    "http://h/../../etc/passwd",
    "http://h/%2e%2e/%2E%2e/x",
    "http://h/%2E%2e/",
    "http://h/..%2f..%2fetc",
    "http://h/..%5c..%5cwin.ini",
    "http://h/a\\..\\..\\b",
    "http://h/%00/%0d%0a/x",
    "http://h//",
    "http://h/./.",
    "http://h/" + "a" * 5000,
    "http://h/" + "é" * 300 + ".iso",
    "http://h/" + "%F0%9F%98%80" * 100,
    "http://h/x?" + "/" * 300,
    "http://" + "a" * 300 + "/x",
    "http://h/%E2%80%AE/%C0%AE%C0%AE/",
]


@pytest.mark.parametrize("url", HOSTILE)
def test_hostile_urls_stay_safe(url: str, tmp_path: Path) -> None:
    name = url_to_path(url)
    _assert_safe(name)
    assert resolve_in_store(tmp_path, name).is_relative_to(tmp_path.resolve())


def test_long_segment_shortened_deterministically() -> None:
    long = "a" * 300
    name = url_to_path(f"http://h/{long}.iso").split("/")[-1]
    assert name == url_to_path(f"http://h/{long}.iso").split("/")[-1]
    assert name.startswith("a" * 180) and name.endswith(".iso")
    assert re.fullmatch(r"a+~[0-9a-f]{16}\.iso", name)
    assert 200 < len(name.encode()) <= 220
    other = url_to_path(f"http://h/{long}b.iso").split("/")[-1]
    assert other != name
    # A long extension is not kept; the cut never splits a character or an escape.
    name = url_to_path("http://h/" + "é" * 150 + "." + "x" * 40).split("/")[-1]
    assert re.fullmatch(r"é+~[0-9a-f]{16}", name)
    name = url_to_path("http://h/" + "%2F" * 100).split("/")[-1]
    assert re.fullmatch(r"(%2F)+~[0-9a-f]{16}", name)


def test_short_name_cannot_impersonate_a_shortened_one() -> None:
    shortened = url_to_path("http://h/" + "a" * 300).split("/")[-1]
    assert url_to_path("http://h/" + shortened) != url_to_path("http://h/" + "a" * 300)


COLLISION_PAIRS = [
    ("http://h/a%3Fb", "http://h/a?b"),
    ("http://h/a%2Fb", "http://h/a/b"),
    ("http://h/a%252Fb", "http://h/a%2Fb"),
    ("http://h/%252e", "http://h/%252E"),
    ("http://h/%2e", "http://h/%252e"),
    ("http://h/a%zz", "http://h/a%25zz"),
    ("http://h/%", "http://h//"),
    ("http://h/%25", "http://h//x"),
    ("http://h/a//b", "http://h/a/%25/b"),
    ("http://h/a//b", "http://h/a/%/b"),
    ("http://h/..", "http://h/%252E%252E"),
    ("http://h/.", "http://h/%2E%2E"),
    ("http://h/a", "http://h/a/"),
    ("http://h/a%5Cb", "http://h/a%255Cb"),
    ("http://h/f?x=/", "http://h/f?x=%2F"),
    ("http://h/f?x=%2F", "http://h/f?x=%252F"),
    ("http://h/f?x=%", "http://h/f?x=%25"),
    ("http://h/f?x=\\", "http://h/f?x=%5C"),
    ("http://h/f%3Fx", "http://h/f?x"),
    ("http://h/f?x", "http://h/f%3F?x"),
    ("http://h/a%00", "http://h/a%2500"),
    ("http://h/%FF", "http://h/%25FF"),
    ("http://h:8080/x", "http://h/x"),
    ("http://h/x", "http://h./x"),
    ("http://h/x", "http://[::1]/x"),
    ("http://h/a/b", "http://h/a%2Fb"),
    ("http://h/index.html%3F", "http://h/?"),
]


@pytest.mark.parametrize(("a", "b"), COLLISION_PAIRS)
def test_distinct_urls_distinct_names(a: str, b: str) -> None:
    assert url_to_path(a) != url_to_path(b)


def test_all_tricky_urls_distinct() -> None:
    urls = {u for pair in COLLISION_PAIRS for u in pair} | set(HOSTILE)
    # Same names by design: an empty query is no query, %2e is ".".
    urls -= {"http://h/?", "http://h/%2e", "http://h/%2E%2E"}
    names = {url_to_path(u) for u in urls}
    assert len(names) == len(urls)


def _canonical(url: str) -> tuple[object, ...]:
    """An independent statement of which URLs are meant to share a name."""
    parts = urlsplit(url)
    segments = []
    for seg in parts.path[1:].split("/"):
        pieces = re.split(r"(%(?![0-9A-Fa-f]{2}))", seg)
        segments.append(tuple(None if p == "%" else unquote_to_bytes(p) for p in pieces))
    if segments[-1] == (b"",):
        segments[-1] = (b"index.html",)
    return (parts.hostname, parts.port, tuple(segments), parts.query)


def test_random_urls_collide_only_when_equivalent() -> None:
    rng = random.Random(1234)
    alphabet = ["a", "B", ".", "%", "2", "5", "e", "E", "F", "f", "/", "\\", "é", "~", "?", "=", "&",
                "%2F", "%2f", "%25", "%2e", "%2E", "%3F", "%00", "%0a", "%5C", "%C3", "%A9", "%FF", "index.html"]
    seen: dict[str, tuple[object, ...]] = {}
    for _ in range(20000):
        path = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        if rng.random() < 0.02:
            path += rng.choice(alphabet) * rng.randint(60, 120)
        url = "http://h/" + path
        name = url_to_path(url)
        _assert_safe(name)
        canonical = _canonical(url)
        assert seen.setdefault(name, canonical) == canonical, url


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a", "a"),
        ("isos/b.iso", "isos/b.iso"),
        ("a//b///c", "a/b/c"),
        ("%2e%2e/x", "%2e%2e/x"),
        ("...", "..."),
        ("a..b/.c", "a..b/.c"),
        ("dir/ü ñ.txt", "dir/ü ñ.txt"),
        ("host:8080/x", "host:8080/x"),
    ],
)
def test_safe_relpath_accepts(path: str, expected: str) -> None:
    assert safe_relpath(path) == expected


@pytest.mark.parametrize(
    "path",
    ["", "/x", "//x", "C:\\x", "C:x", "c:/x", "\\\\server\\share", "a\\b", "a\x00b", "a\nb", ".", "..",
     "../x", "a/../b", "a/./b", "a/..", "x/", "a" * 256],
)
def test_safe_relpath_rejects(path: str) -> None:
    with pytest.raises(ValueError):
        safe_relpath(path)


def test_resolve_in_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    assert resolve_in_store(store, "a//b/c.iso") == store.resolve() / "a" / "b" / "c.iso"
    assert resolve_in_store(str(store), "%2e%2e/x") == store.resolve() / "%2e%2e" / "x"
    assert not (store / "a").exists()
    for bad in ["../x", "/etc/passwd", "a/../../x", "C:\\x"]:
        with pytest.raises(ValueError):
            resolve_in_store(store, bad)


def test_resolve_in_store_refuses_planted_symlinks(tmp_path: Path) -> None:
    store, outside = tmp_path / "store", tmp_path / "outside"
    store.mkdir()
    outside.mkdir()
    (store / "ok").mkdir()
    os.symlink(outside, store / "ok" / "evil")
    with pytest.raises(ValueError, match="is a symbolic link"):
        resolve_in_store(store, "ok/evil/x.iso")
    os.symlink(outside / "target", store / "file.iso")  # dangling, at the file itself
    with pytest.raises(ValueError, match="is a symbolic link"):
        resolve_in_store(store, "file.iso")
    os.symlink(store / "ok", store / "inner")  # even one pointing inside
    with pytest.raises(ValueError, match="is a symbolic link"):
        resolve_in_store(store, "inner/x")
    (store / "plain").write_bytes(b"")
    assert resolve_in_store(store, "plain/below") == store.resolve() / "plain" / "below"


def test_resolve_in_store_accepts_symlinked_store(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    os.symlink(real, link)
    assert resolve_in_store(link, "a/b") == real / "a" / "b"
