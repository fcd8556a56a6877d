"""The hashing writer on its own: resume rules, length and size checks, atomic rename."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fetcher.writer import FileTooLarge, HashingWriter, LengthMismatch, ResumeMismatch, hash_file

BODY = bytes(range(256)) * 4000  # 1,024,000 bytes


def headers(**values: str) -> dict[str, bytes]:
    """Stands in for scrapy Headers: .get(name) -> bytes | None."""
    return {k.replace("_", "-"): v.encode() for k, v in values.items()}


def fill(writer: HashingWriter, data: bytes, chunk: int = 65536) -> None:
    for i in range(0, len(data), chunk):
        writer.write(data[i : i + chunk])


def test_complete_body_is_hashed_and_renamed(tmp_path: Path) -> None:
    final = tmp_path / "host" / "a.bin"
    w = HashingWriter(final, ("sha256", "md5"))
    w.prepare("http://h/a.bin", resume=True)
    assert w.begin(200, headers(Content_Length=str(len(BODY)), ETag='"v1"'), "http://h/a.bin")
    fill(w, BODY[:500_000])
    assert not final.exists() and w.part.exists()  # never partial at the final name
    fill(w, BODY[500_000:])
    w.finish()
    w.commit()
    assert final.read_bytes() == BODY
    assert not w.part.exists() and not w.meta.exists()
    assert w.hexdigests() == {"sha256": hashlib.sha256(BODY).hexdigest(), "md5": hashlib.md5(BODY).hexdigest()}
    assert hash_file(final, ("sha256",)) == (len(BODY), {"sha256": hashlib.sha256(BODY).hexdigest()})


def test_resume_continues_the_part_and_digests_the_whole_file(tmp_path: Path) -> None:
    final = tmp_path / "a.bin"
    url = "http://h/a.bin"
    first = HashingWriter(final, ("sha256",))
    first.prepare(url, resume=True)
    first.begin(200, headers(Content_Length=str(len(BODY)), ETag='"v1"'), url)
    fill(first, BODY[:300_000])
    first.close()  # the connection dropped

    second = HashingWriter(final, ("sha256",))  # a new process: state comes from disk
    second.prepare(url, resume=True)
    assert second.range_headers() == {"Range": "bytes=300000-", "If-Range": '"v1"'}
    rest = len(BODY) - 300_000
    assert second.begin(
        206,
        headers(Content_Length=str(rest), Content_Range=f"bytes 300000-{len(BODY) - 1}/{len(BODY)}", ETag='"v1"'),
        url,
    )
    fill(second, BODY[300_000:])
    second.finish()
    second.commit()
    assert final.read_bytes() == BODY
    assert second.hexdigests()["sha256"] == hashlib.sha256(BODY).hexdigest()


def test_full_answer_to_a_range_request_starts_over(tmp_path: Path) -> None:
    final = tmp_path / "a.bin"
    url = "http://h/a.bin"
    w = HashingWriter(final, ("sha256",))
    w.prepare(url, resume=True)
    w.begin(200, headers(ETag='"v1"'), url)
    fill(w, b"x" * 1000)
    w.close()
    w.prepare(url, resume=True)
    assert w.range_headers()["Range"] == "bytes=1000-"
    w.begin(200, headers(Content_Length=str(len(BODY)), ETag='"v2"'), url)  # If-Range did not match
    fill(w, BODY)
    w.finish()
    w.commit()
    assert final.read_bytes() == BODY  # no splice of two versions
    assert w.hexdigests()["sha256"] == hashlib.sha256(BODY).hexdigest()


def test_part_without_validators_or_of_another_url_is_not_resumed(tmp_path: Path) -> None:
    final = tmp_path / "a.bin"
    w = HashingWriter(final, ("sha256",))
    w.prepare("http://h/a.bin", resume=True)
    w.begin(200, headers(), "http://h/a.bin")  # no ETag, no Last-Modified
    fill(w, b"x" * 10)
    w.close()
    w.prepare("http://h/a.bin", resume=True)
    assert w.range_headers() == {}
    w.begin(200, headers(ETag='"e"'), "http://h/a.bin")
    fill(w, b"y" * 10)
    w.close()
    w.prepare("http://h/other.bin", resume=True)
    assert w.range_headers() == {}


def test_wrong_resume_offset_is_refused(tmp_path: Path) -> None:
    w = HashingWriter(tmp_path / "a", ("sha256",))
    w.prepare("u", resume=False)
    with pytest.raises(ResumeMismatch):
        w.begin(206, headers(Content_Range="bytes 10-19/20"), "u")


def test_short_body_and_size_cap(tmp_path: Path) -> None:
    w = HashingWriter(tmp_path / "a", ("sha256",))
    w.prepare("u", resume=False)
    w.begin(200, headers(Content_Length="100"), "u")
    w.write(b"x" * 60)
    with pytest.raises(LengthMismatch):
        w.finish()
    capped = HashingWriter(tmp_path / "b", ("sha256",), max_size=50)
    capped.prepare("u", resume=False)
    with pytest.raises(FileTooLarge):
        capped.begin(200, headers(Content_Length="100"), "u")
    capped.begin(200, headers(), "u")  # length unknown: caught while writing
    with pytest.raises(FileTooLarge):
        capped.write(b"x" * 51)


def test_error_status_writes_nothing(tmp_path: Path) -> None:
    w = HashingWriter(tmp_path / "a", ("sha256",))
    w.prepare("u", resume=True)
    assert not w.begin(404, headers(), "u")
    assert not w.part.exists()
