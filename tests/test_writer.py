"""The hashing writer on its own: resume rules, length and size checks, atomic rename."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from fetcher.store.diskio import hash_file
from fetcher.store.writer import (
    FileTooLarge,
    HashingWriter,
    LengthMismatch,
    ResumeMismatch,
)

BODY = bytes(range(256)) * 4000  # 1,024,000 bytes


def headers(**values: str) -> dict[str, bytes]:
    """Stands in for scrapy Headers: .get(name) -> bytes | None."""
    return {k.replace("_", "-"): v.encode() for k, v in values.items()}


def fill(writer: HashingWriter, data: bytes, chunk: int = 65536) -> None:
    for i in range(0, len(data), chunk):
        writer.write(data[i : i + chunk])


def test_complete_body_is_hashed_and_renamed(tmp_path: Path) -> None:
    final = tmp_path / "host" / "a.bin"
    w = HashingWriter(final, "http://h/a.bin", ("sha256", "md5"))
    w.prepare()
    assert w.begin(200, headers(Content_Length=str(len(BODY)), ETag='"v1"'))
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
    first = HashingWriter(final, url, ("sha256",))
    first.prepare()
    first.begin(200, headers(Content_Length=str(len(BODY)), ETag='"v1"'))
    fill(first, BODY[:300_000])
    first.close()  # the connection dropped

    second = HashingWriter(final, url, ("sha256",))  # a new process: state comes from disk
    second.prepare()
    assert second.range_headers() == {"Range": "bytes=300000-", "If-Range": '"v1"'}
    rest = len(BODY) - 300_000
    assert second.begin(
        206,
        headers(Content_Length=str(rest), Content_Range=f"bytes 300000-{len(BODY) - 1}/{len(BODY)}", ETag='"v1"'),
    )
    fill(second, BODY[300_000:])
    second.finish()
    second.commit()
    assert final.read_bytes() == BODY
    assert second.hexdigests()["sha256"] == hashlib.sha256(BODY).hexdigest()


def test_full_answer_to_a_range_request_starts_over(tmp_path: Path) -> None:
    final = tmp_path / "a.bin"
    url = "http://h/a.bin"
    w = HashingWriter(final, url, ("sha256",))
    w.prepare()
    w.begin(200, headers(ETag='"v1"'))
    fill(w, b"x" * 1000)
    w.close()
    w.prepare()
    assert w.range_headers()["Range"] == "bytes=1000-"
    w.begin(200, headers(Content_Length=str(len(BODY)), ETag='"v2"'))  # If-Range did not match
    fill(w, BODY)
    w.finish()
    w.commit()
    assert final.read_bytes() == BODY  # no splice of two versions
    assert w.hexdigests()["sha256"] == hashlib.sha256(BODY).hexdigest()


def test_a_206_of_another_version_is_refused(tmp_path: Path) -> None:
    """A server that ignores If-Range must not get its new bytes spliced onto old ones."""
    w = HashingWriter(tmp_path / "a", "u", ("sha256",))
    w.prepare()
    w.begin(200, headers(ETag='"v1"', Content_Length="20"))
    fill(w, b"x" * 10)
    w.close()
    w.prepare()
    with pytest.raises(ResumeMismatch):
        w.begin(206, headers(Content_Range="bytes 10-19/20", ETag='"v2"'))


def test_part_without_validators_or_of_another_url_is_not_resumed(tmp_path: Path) -> None:
    final = tmp_path / "a.bin"
    w = HashingWriter(final, "http://h/a.bin", ("sha256",))
    w.prepare()
    w.begin(200, headers())  # no ETag, no Last-Modified
    fill(w, b"x" * 10)
    w.close()
    w.prepare()
    assert w.range_headers() == {}
    w.begin(200, headers(ETag='"e"'))
    fill(w, b"y" * 10)
    w.close()
    other = HashingWriter(final, "http://h/other.bin", ("sha256",))
    other.prepare()
    assert other.range_headers() == {}
    no_resume = HashingWriter(final, "http://h/a.bin", ("sha256",), resume=False)
    no_resume.prepare()
    assert no_resume.range_headers() == {}


def test_wrong_resume_offset_is_refused(tmp_path: Path) -> None:
    w = HashingWriter(tmp_path / "a", "u", ("sha256",))
    w.prepare()
    with pytest.raises(ResumeMismatch):
        w.begin(206, headers(Content_Range="bytes 10-19/20"))


def test_a_complete_part_is_recognised_by_416(tmp_path: Path) -> None:
    final = tmp_path / "a"
    w = HashingWriter(final, "u", ("sha256",))
    w.prepare()
    w.begin(200, headers(ETag='"e"'))
    fill(w, b"z" * 100)
    w.close()
    w.prepare()
    assert w.is_complete_part(416, headers(Content_Range="bytes */100"))
    assert not w.is_complete_part(416, headers(Content_Range="bytes */150"))
    w.commit()
    assert final.read_bytes() == b"z" * 100
    assert w.hexdigests()["sha256"] == hashlib.sha256(b"z" * 100).hexdigest()


def test_short_body_and_size_cap(tmp_path: Path) -> None:
    w = HashingWriter(tmp_path / "a", "u", ("sha256",))
    w.prepare()
    w.begin(200, headers(Content_Length="100"))
    w.write(b"x" * 60)
    with pytest.raises(LengthMismatch):
        w.finish()
    capped = HashingWriter(tmp_path / "b", "u", ("sha256",), max_size=50)
    capped.prepare()
    with pytest.raises(FileTooLarge):
        capped.begin(200, headers(Content_Length="100"))
    capped.begin(200, headers())  # length unknown: caught while writing
    with pytest.raises(FileTooLarge):
        capped.write(b"x" * 51)


def test_a_short_body_can_be_accepted(tmp_path: Path) -> None:
    """DOWNLOAD_FAIL_ON_DATALOSS=False: the bytes that arrived are the file; a longer body still fails."""
    w = HashingWriter(tmp_path / "a", "u", ("sha256",))
    w.prepare()
    w.begin(200, headers(Content_Length="100"))
    w.write(b"x" * 60)
    w.finish(accept_short=True)
    w.commit()
    assert (tmp_path / "a").read_bytes() == b"x" * 60 and w.size == 60
    assert w.hexdigests()["sha256"] == hashlib.sha256(b"x" * 60).hexdigest()
    long = HashingWriter(tmp_path / "b", "u", ("sha256",))
    long.prepare()
    long.begin(200, headers(Content_Length="10"))
    long.write(b"x" * 11)
    with pytest.raises(LengthMismatch):
        long.finish(accept_short=True)


def test_error_status_writes_nothing(tmp_path: Path) -> None:
    w = HashingWriter(tmp_path / "a", "u", ("sha256",))
    w.prepare()
    assert not w.begin(404, headers())
    assert not w.part.exists()


# -- preallocation (FETCHER_FILE_ALLOCATION) ----------------------------------------------

BIG = 8 << 20  # over the 5 MiB below which nothing is preallocated


def _begin_big(final: Path, allocation: str = "falloc", **kwargs: object) -> HashingWriter:
    w = HashingWriter(final, "http://h/big.bin", ("sha256",), allocation=allocation, **kwargs)  # type: ignore[arg-type]
    w.prepare()
    assert w.begin(200, headers(Content_Length=str(BIG), ETag='"v1"'))
    return w


@pytest.mark.parametrize("allocation", ["falloc", "trunc", "prealloc"])
def test_preallocated_part_keeps_its_offset_in_the_meta(tmp_path: Path, allocation: str) -> None:
    w = _begin_big(tmp_path / "big.bin", allocation)
    fill(w, BODY * 2)
    assert w.part.stat().st_size == BIG  # the whole file's length from the first write
    w._checkpoint()  # as the timer does while the body flows; then a kill -9 (no close)
    fill(w, BODY)  # written after the last checkpoint: not trusted by the next process
    w._file.flush()  # type: ignore[union-attr]
    again = HashingWriter(tmp_path / "big.bin", "http://h/big.bin", ("sha256",), allocation=allocation)
    again.prepare()
    assert again.range_headers()["Range"] == f"bytes={2 * len(BODY)}-"
    assert again.hexdigests() == {"sha256": hashlib.sha256(BODY * 2).hexdigest()}


def test_closed_or_short_preallocated_part_is_cut_to_its_bytes(tmp_path: Path) -> None:
    w = _begin_big(tmp_path / "big.bin")
    fill(w, BODY)
    w.close()  # the connection dropped: no zeros are left after the bytes
    assert w.part.stat().st_size == len(BODY)
    w = _begin_big(tmp_path / "short.bin")
    fill(w, BODY)
    w.finish(accept_short=True)  # DOWNLOAD_FAIL_ON_DATALOSS=False: what arrived is the file
    w.commit()
    assert (tmp_path / "short.bin").read_bytes() == BODY and not w.meta.exists()


def test_nothing_is_preallocated_past_max_size_or_for_small_files(tmp_path: Path) -> None:
    small = HashingWriter(tmp_path / "s.bin", "http://h/s.bin", ("sha256",), allocation="falloc")
    small.prepare()
    small.begin(200, headers(Content_Length=str(len(BODY) * 4), ETag='"v1"'))  # 4 MB: under 5 MiB
    small.write(BODY[:1000])
    small.close()
    assert small.part.stat().st_size == 1000
    with pytest.raises(FileTooLarge):
        _begin_big(tmp_path / "big.bin", max_size=BIG - 1)
    assert not (tmp_path / "big.bin.part").exists()


def test_old_meta_without_offset_resumes_from_the_part_size(tmp_path: Path) -> None:
    final = tmp_path / "a.bin"
    final.with_name("a.bin.part").write_bytes(BODY[:300_000])
    final.with_name("a.bin.part.meta").write_text('{"url": "http://h/a.bin", "etag": "\\"v1\\"", '
                                                   '"last_modified": null, "length": null}')
    w = HashingWriter(final, "http://h/a.bin", ("sha256",), allocation="falloc")
    w.prepare()
    assert w.range_headers()["Range"] == "bytes=300000-"


def test_disk_that_cannot_hold_the_file_fails_before_writing(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from fetcher.store.writer import StorageError

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    w = _begin_big(tmp_path / "big.bin")
    with pytest.raises(StorageError, match=r"the disk cannot hold 8\.0 MiB") as caught:
        w.write(BODY[:65536])
    assert not caught.value.retryable and not caught.value.keeps_part
    assert w.part.stat().st_size == 0 and w.transferred == 0


def test_big_body_hashed_on_a_worker_thread_has_the_digest_of_its_bytes(tmp_path: Path) -> None:
    data = (BODY * 9)[: BIG + 12345]  # batches of 1 MiB and a last short one
    w = HashingWriter(tmp_path / "big.bin", "http://h/big.bin", ("sha256", "md5"))
    w.prepare()
    assert w.begin(200, headers(Content_Length=str(len(data)), ETag='"v1"'))
    fill(w, data, chunk=65_000)
    w.finish()
    digests = w.hexdigests()
    w.commit()
    assert digests == {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()}
    assert (tmp_path / "big.bin").read_bytes() == data


def test_a_disk_error_on_the_worker_thread_fails_the_body(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from fetcher.store.writer import StorageError

    def broken(fd: int, data: object, at: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    w = _begin_big(tmp_path / "big.bin", "none")
    monkeypatch.setattr(os, "pwrite", broken)
    with pytest.raises(StorageError, match="Input/output error") as caught:
        fill(w, BODY * 3)  # the first batch fails on the worker; the next hand-over says so
        w.finish()
    assert not caught.value.retryable
    w.close()  # no second error, the .part kept or dropped by the caller


def test_short_writes_on_the_worker_thread_lose_no_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write may take fewer bytes than it was given (a signal, a nearly full disk): the rest follows."""
    import os

    real = os.pwrite

    def short(fd: int, data: bytes, at: int) -> int:
        return real(fd, bytes(data)[:40_000], at)  # never more than 40,000 bytes at a time

    data = (BODY * 3)[:3_000_000]
    w = HashingWriter(tmp_path / "big.bin", "http://h/big.bin", ("sha256",))
    w.prepare()
    assert w.begin(200, headers(Content_Length=str(len(data)), ETag='"v1"'))
    monkeypatch.setattr(os, "pwrite", short)
    fill(w, data, chunk=65_000)
    w.finish()
    digests = w.hexdigests()
    w.commit()
    assert (tmp_path / "big.bin").read_bytes() == data
    assert digests["sha256"] == hashlib.sha256(data).hexdigest()


def test_the_disk_worker_takes_the_next_batch_without_the_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once its batch is written, the worker takes the batch gathered meanwhile itself: the
    reader is told it may read on, and the bytes reach the disk with no further call from the
    reactor thread (that round trip between batches left the worker idle a third of the time on
    one 1 GiB body)."""
    import os
    import threading

    from fetcher.store import diskio

    real, busy = os.pwrite, threading.Event()

    def slow(fd: int, data: bytes, at: int) -> int:
        busy.wait(10)
        return real(fd, data, at)

    monkeypatch.setattr(diskio.os, "pwrite", slow)
    w = _begin_big(tmp_path / "big.bin", "none")
    data = (BODY * 2)[: (1 << 20) + (256 << 10)]
    fill(w, data[: 256 << 10])  # handed over at once: the worker is busy with it
    fill(w, data[256 << 10 :])  # gathered meanwhile: a full batch
    pending = w.ready()
    assert pending is not None and not pending.done()  # the reader waits
    busy.set()
    pending.result(timeout=10)  # the worker took the full batch...
    deadline = time.monotonic() + 10
    while w.part.stat().st_size < len(data) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.part.read_bytes() == data  # ...and wrote it, with nothing asked of it since
    assert w.ready() is None
    w.close()


def test_bodies_fed_as_the_handler_feeds_them_arrive_whole_under_a_jittery_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight big bodies at once, reads of every size, a disk whose writes take 0-2 ms: each body
    fed as the handler feeds it (a read, then ``ready``; none while that is pending; at the end
    ``settle`` until None, then ``finish``), while the workers take batches on their own. Every
    file and digest is the body's, byte for byte, in order."""
    import os
    import random
    import threading

    from fetcher.store import diskio

    real, jitter, lock = os.pwrite, random.Random(7), threading.Lock()

    def jittery(fd: int, data: bytes, at: int) -> int:
        with lock:
            pause = jitter.random() * 0.002
        time.sleep(pause)
        return real(fd, data, at)

    monkeypatch.setattr(diskio.os, "pwrite", jittery)
    rng = random.Random(11)
    bodies = [bytes(rng.getrandbits(8) for _ in range(997)) * rng.randint(1100, 6000) for _ in range(8)]
    writers, given, waiting = [], [0] * len(bodies), [None] * len(bodies)
    for i, data in enumerate(bodies):
        w = HashingWriter(tmp_path / f"{i}.bin", f"http://h/{i}.bin", ("sha256",))
        w.prepare()
        assert w.begin(200, headers(Content_Length=str(len(data)), ETag='"v1"'))
        writers.append(w)
    deadline = time.monotonic() + 60
    while not all(g == len(d) for g, d in zip(given, bodies, strict=True)):
        assert time.monotonic() < deadline, given
        progressed = False
        for i, (w, data) in enumerate(zip(writers, bodies, strict=True)):
            pending = waiting[i]
            if given[i] == len(data) or (pending is not None and not pending.done()):  # type: ignore[attr-defined]
                continue
            size = rng.choice((1024, 65536, 200_000, 1 << 20, 1_500_000))
            w.write(data[given[i] : given[i] + size])
            given[i] = min(len(data), given[i] + size)
            waiting[i] = w.ready()
            progressed = True
        if not progressed:
            time.sleep(0.001)
    for i, (w, data) in enumerate(zip(writers, bodies, strict=True)):
        while (pending := w.settle()) is not None:
            pending.result(timeout=30)
        w.finish()
        digests = w.hexdigests()
        w.commit()
        assert digests["sha256"] == hashlib.sha256(data).hexdigest(), i
        assert (tmp_path / f"{i}.bin").read_bytes() == data, i


def test_bodies_whose_disk_falls_behind_hold_little_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many big bodies at once, their disk worker stuck: fed as the handler feeds them (a read,
    then ``ready``; none while it is pending), all of them together keep at most the workers'
    budget in memory, plus about a read each, not a batch or two each. Then the disk catches
    up and every file is whole."""
    import os
    import threading

    from fetcher.store import diskio

    real, stuck, written = os.pwrite, threading.Event(), [0]

    def slow(fd: int, data: bytes, at: int) -> int:
        stuck.wait(10)
        n = real(fd, data, at)
        written[0] += n
        return n

    monkeypatch.setattr(diskio.os, "pwrite", slow)
    data, chunk = (BODY * 5)[: 4 << 20], 256 * 1024
    writers = []
    for i in range(12):
        w = HashingWriter(tmp_path / f"{i}.bin", f"http://h/{i}.bin", ("sha256",))
        w.prepare()
        assert w.begin(200, headers(Content_Length=str(len(data)), ETag='"v1"'))
        writers.append(w)
    given = [0] * len(writers)
    waiting: list[object] = [None] * len(writers)
    held = 0
    while True:
        fed = False
        for i, w in enumerate(writers):
            pending = waiting[i]
            if given[i] == len(data) or (pending is not None and not pending.done()):  # type: ignore[attr-defined]
                continue
            w.write(data[given[i] : given[i] + chunk])
            given[i] += chunk
            waiting[i] = w.ready()
            held = max(held, sum(given) - written[0])
            fed = True
        if not fed:
            if stuck.is_set():
                time.sleep(0.01)
                if all(g == len(data) for g in given):
                    break
                continue
            # Every reader waits for the stuck disk: what is in memory now is the most it holds.
            assert held <= diskio._HELD_LIMIT + len(writers) * chunk, held
            assert held >= diskio._HELD_LIMIT  # the budget, not less, was used
            stuck.set()
    for i, w in enumerate(writers):
        w.finish()
        digests = w.hexdigests()
        w.commit()
        assert digests["sha256"] == hashlib.sha256(data).hexdigest()
        assert (tmp_path / f"{i}.bin").read_bytes() == data
