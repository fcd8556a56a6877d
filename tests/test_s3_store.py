"""FILES_STORE=s3://bucket/prefix end to end: real ``scrapy crawl fetch`` runs against the
test origin and a real S3 server (SeaweedFS, tests/s3.py) on 127.0.0.1.

One server for the module (it takes ~2 s to start); every test uses its own bucket, and
its own state and spool folders under tmp_path (FETCHER_STATE_DIR, FETCHER_SPOOL, and
XDG_STATE_HOME/TMPDIR too, so no run ever writes outside tmp_path).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("boto3", reason="the S3 store tests need boto3 (pip install -e '.[test]')")

from tests.conftest import Fetch, Run
from tests.origin import Gen, Origin
from tests.s3 import S3Server, weed_binary

MiB = 1024 * 1024
BIG = 64 * MiB
THRESHOLD = 8 * MiB  # FETCHER_MULTIPART_THRESHOLD's default: BIG goes up in 8 parts
PREFIX = "mirror/files"
_buckets = itertools.count(1)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    try:
        weed_binary()
    except RuntimeError as exc:
        pytest.skip(f"no S3 server for the S3 store tests: {exc}")
    with S3Server().start() as server:
        yield server


@pytest.fixture
def bucket(s3: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test, so no test sees another's objects."""
    name = f"t{next(_buckets)}-" + request.node.name.lower().replace("_", "-")
    return s3.create_bucket("".join(c for c in name if c.isalnum() or c == "-")[:50].rstrip("-"))


class S3Fetch(Fetch):
    """``scrapy crawl fetch`` with FILES_STORE=s3://<bucket>/<prefix> and everything local under cwd."""

    def __init__(self, cwd: Path, s3: S3Server, bucket: str, prefix: str = PREFIX, **aws: str) -> None:
        super().__init__(cwd)
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix
        self.state = cwd / "state"
        self.spool = cwd / "spool"
        self.aws = {
            "AWS_ENDPOINT_URL": s3.endpoint_url,
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "AWS_REGION_NAME": s3.region,
            "AWS_USE_SSL": "False",
            "AWS_VERIFY": "False",
            **aws,
        }
        self.pythonpath_first: Path | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def command(self, *args: str, settings: dict[str, Any] | None = None) -> list[str]:
        base = {
            "FILES_STORE": self.uri,
            "FETCHER_STATE_DIR": str(self.state),
            "FETCHER_SPOOL": str(self.spool),
            **self.aws,
        }
        return super().command(*args, settings={**base, **(settings or {})})

    def env(self) -> dict[str, str]:
        env = super().env()
        for name in list(env):
            if name.startswith("AWS_"):  # only the settings above say where the store is
                del env[name]
        env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        env["XDG_STATE_HOME"] = str(self.cwd / "xdg-state")
        env["TMPDIR"] = str(self.cwd / "tmp")
        (self.cwd / "tmp").mkdir(exist_ok=True)
        if self.pythonpath_first is not None:
            env["PYTHONPATH"] = str(self.pythonpath_first) + os.pathsep + env["PYTHONPATH"]
        return env

    # -- what is in the store

    def key(self, path: str) -> str:
        return f"{self.prefix}/{path}"

    def keys(self) -> set[str]:
        client = self.s3.client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return {obj["Key"] for page in pages for obj in page.get("Contents", ())}

    def object_digest(self, path: str) -> tuple[int, str]:
        """Size and sha256 of the object's bytes, by a GET from the test."""
        body = self.s3.client().get_object(Bucket=self.bucket, Key=self.key(path))["Body"]
        h, size = hashlib.sha256(), 0
        while chunk := body.read(MiB):
            h.update(chunk)
            size += len(chunk)
        return size, h.hexdigest()

    def head(self, path: str) -> dict[str, Any]:
        return dict(self.s3.client().head_object(Bucket=self.bucket, Key=self.key(path)))

    def remote_manifest(self) -> list[dict[str, Any]]:
        body = self.s3.client().get_object(Bucket=self.bucket, Key=self.key("manifest.jsonl"))["Body"].read()
        return [json.loads(line) for line in body.decode().splitlines()]

    def local_manifest(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.state / "manifest.jsonl").read_text().splitlines()]

    def spool_files(self) -> list[Path]:
        return [p for p in self.spool.rglob("*") if p.is_file()] if self.spool.exists() else []


SMALL = [Gen("small/a.bin", 10 * 1024), Gen("small/b.txt", 1), Gen("c.iso", 3 * MiB), Gen("empty.bin", 0)]


def listing(origin: Origin, files: list[Gen]) -> str:
    return "".join(f"{f.url(origin)}\n" for f in files)


def by_url(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["url"]: r for r in records}


def assert_no_traceback(run: Run) -> None:
    assert "Traceback" not in run.stderr + run.stdout, run.stderr[-4000:]


# --------------------------------------------------------------------------- the first run and reruns


@dataclass
class Mirrored:
    """A store after its first run: SMALL + one 64 MiB file uploaded to a fresh bucket."""

    fetch: S3Fetch
    files: list[Gen]
    list_text: str
    run: Run
    s3_requests: list[Any]


@pytest.fixture(scope="module")
def mirrored(s3: S3Server, origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Mirrored:
    fetch = S3Fetch(tmp_path_factory.mktemp("mirrored"), s3, s3.create_bucket("mirrored"))
    files = [*SMALL, Gen("big/disk.img", BIG)]
    text = listing(origin, files)
    origin.reset_stats()
    s3.reset_counts()
    run = fetch(text)
    return Mirrored(fetch, files, text, run, s3.requests())


def test_first_run_uploads_every_file_with_its_digest(mirrored: Mirrored, origin: Origin) -> None:
    fetch, run = mirrored.fetch, mirrored.run
    assert run.returncode == 0, run.log[-4000:]
    assert "5 downloaded, 0 up to date, 0 failed" in run.log

    expected_keys = {fetch.key(f.path(origin)) for f in mirrored.files}
    assert fetch.keys() == expected_keys | {fetch.key("manifest.jsonl")}
    for f in mirrored.files:
        path = f.path(origin)
        assert fetch.object_digest(path) == (f.size, f.digest), path
        head = fetch.head(path)
        assert head["ContentLength"] == f.size
        assert head["Metadata"].get("fetcher-digest") == f"sha256:{f.digest}", (path, head["Metadata"])
        assert head["Metadata"].get("fetcher-size") == str(f.size), (path, head["Metadata"])


def test_large_file_is_uploaded_in_parts(mirrored: Mirrored, origin: Origin) -> None:
    fetch = mirrored.fetch
    big = mirrored.files[-1]
    key = fetch.key(big.path(origin))
    parts = BIG // THRESHOLD
    on_key = [r for r in mirrored.s3_requests if r.bucket == fetch.bucket and r.key == key]
    assert sum(r.method == "POST" and r.query == "uploads" for r in on_key) == 1, on_key
    assert sum(r.method == "PUT" and "partNumber=" in r.query for r in on_key) == parts, on_key
    assert not [r for r in on_key if r.method == "PUT" and "partNumber=" not in r.query]  # no single PUT
    assert fetch.head(big.path(origin))["ETag"].strip('"').endswith(f"-{parts}")
    for small in mirrored.files[:-1]:  # below the threshold: one PUT each
        skey = fetch.key(small.path(origin))
        assert [(r.method, r.query) for r in mirrored.s3_requests
                if r.key == skey and r.method in ("PUT", "POST")] == [("PUT", "")], skey


def test_manifest_records_downloads_and_is_uploaded(mirrored: Mirrored, origin: Origin) -> None:
    fetch = mirrored.fetch
    records = by_url(fetch.remote_manifest())  # <prefix>/manifest.jsonl, uploaded at the end of the run
    assert set(records) == {f.url(origin) for f in mirrored.files}
    for f in mirrored.files:
        r = records[f.url(origin)]
        assert r["status"] == "downloaded" and r["error"] is None, r
        assert r["path"] == f.path(origin)
        assert r["size"] == f.size and r["algorithm"] == "sha256" and r["checksum"] == f.digest
    assert not (fetch.cwd / "downloads").exists()  # nothing went to the default local store


def test_records_live_in_fetcher_state_dir(mirrored: Mirrored) -> None:
    """SQLite index, manifest.jsonl (and failed.txt) all in FETCHER_STATE_DIR; the uploaded manifest is a copy."""
    fetch = mirrored.fetch
    found = sorted(str(p.relative_to(fetch.cwd)) for p in fetch.cwd.rglob("manifest.jsonl"))
    assert (fetch.state / "manifest.jsonl").is_file(), f"manifest.jsonl written to {found}, not to state/"
    assert (fetch.state / "index.sqlite").is_file()
    assert by_url(fetch.local_manifest()) == by_url(fetch.remote_manifest())
    assert not (fetch.cwd / "xdg-state").exists()  # nothing in the default state folder


def test_spool_is_empty_after_the_run(mirrored: Mirrored) -> None:
    assert mirrored.fetch.spool_files() == []


def test_rerun_is_uptodate_by_head_alone(mirrored: Mirrored, origin: Origin, s3: S3Server) -> None:
    fetch = mirrored.fetch
    origin.reset_stats()
    s3.reset_counts()
    run = fetch(mirrored.list_text)
    assert run.returncode == 0, run.log[-4000:]
    assert "0 downloaded, 5 up to date, 0 failed" in run.log
    assert origin.stats.bytes_sent == 0
    assert origin.stats.hits == 0
    requests = s3.requests()
    object_keys = {fetch.key(f.path(origin)) for f in mirrored.files}
    heads = {r.key for r in requests if r.method == "HEAD"}
    assert object_keys <= heads, requests
    assert not [r for r in requests if r.method == "GET" and r.key in object_keys], requests
    assert not [r for r in requests if r.key in object_keys and r.method in ("PUT", "POST")], requests
    assert s3.body_bytes_sent() == 0  # SeaweedFS's own count: no object body left the server
    records = by_url(fetch.remote_manifest())
    assert {r["status"] for r in records.values()} == {"uptodate"}
    for f in mirrored.files:
        assert records[f.url(origin)]["checksum"] == f.digest
        assert records[f.url(origin)]["size"] == f.size
    assert fetch.spool_files() == []


def test_object_deleted_behind_fetchers_back_is_fetched_again(
    tmp_path: Path, s3: S3Server, bucket: str, origin: Origin
) -> None:
    fetch = S3Fetch(tmp_path, s3, bucket)
    text = listing(origin, SMALL)
    run = fetch(text)
    assert run.returncode == 0, run.log[-4000:]
    gone = SMALL[2]
    s3.client().delete_object(Bucket=bucket, Key=fetch.key(gone.path(origin)))

    origin.reset_stats()
    again = fetch(text)
    assert again.returncode == 0, again.log[-4000:]
    assert "1 downloaded, 3 up to date, 0 failed" in again.log
    assert dict(origin.stats.snapshot().hits_by_path) == {f"/gen/{gone.size}/{gone.name}": 1}
    assert origin.stats.bytes_sent == gone.size
    assert fetch.object_digest(gone.path(origin)) == (gone.size, gone.digest)
    assert fetch.head(gone.path(origin))["Metadata"]["fetcher-digest"] == f"sha256:{gone.digest}"
    records = by_url(fetch.remote_manifest())
    assert records[gone.url(origin)]["status"] == "downloaded"
    assert "missing from the store" in (records[gone.url(origin)]["note"] or "")
    assert {records[f.url(origin)]["status"] for f in SMALL if f != gone} == {"uptodate"}
    assert fetch.spool_files() == []


# --------------------------------------------------------------------------- a store that cannot start


def assert_cannot_start(run: Run, origin: Origin, *needles: str) -> None:
    assert run.returncode != 0, run.log[-4000:]
    assert "ERROR: Cannot start: " in run.log, run.log[-4000:]
    line = next(x for x in run.log.splitlines() if "ERROR: Cannot start: " in x)
    for needle in needles:
        assert needle in line, (needle, line)
    assert_no_traceback(run)
    assert origin.stats.hits == 0 and origin.stats.connections == 0


@pytest.mark.parametrize(
    "aws",
    [{"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, {"AWS_ACCESS_KEY_ID": "not-a-key"}],
    ids=["wrong secret", "unknown key"],
)
def test_bad_credentials_stop_the_run_before_the_list(
    tmp_path: Path, s3: S3Server, bucket: str, origin: Origin, aws: dict[str, str]
) -> None:
    fetch = S3Fetch(tmp_path, s3, bucket, **aws)
    origin.reset_stats()
    run = fetch(listing(origin, SMALL[:2]))
    assert_cannot_start(run, origin, f"s3://{bucket}/{PREFIX}", "AWS_SECRET_ACCESS_KEY")
    assert s3.client().list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_unknown_bucket_stops_the_run_before_the_list(tmp_path: Path, s3: S3Server, origin: Origin) -> None:
    fetch = S3Fetch(tmp_path, s3, "no-such-bucket")
    origin.reset_stats()
    run = fetch(listing(origin, SMALL[:2]))
    assert_cannot_start(run, origin, "s3://no-such-bucket/", "NoSuchBucket")


def test_unreachable_endpoint_stops_the_run_before_the_list(
    tmp_path: Path, s3: S3Server, bucket: str, origin: Origin
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    # The port is closed now: every connection is refused at once.
    fetch = S3Fetch(tmp_path, s3, bucket, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    origin.reset_stats()
    started = time.monotonic()
    run = fetch(listing(origin, SMALL[:2]), timeout=60)
    elapsed = time.monotonic() - started
    assert_cannot_start(run, origin, f"127.0.0.1:{port}", "AWS_ENDPOINT_URL")
    assert elapsed < 30, elapsed


# A directory put first on PYTHONPATH that makes the S3 libraries unusable, two ways:
BROKEN = 'raise ImportError("simulated")\n'  # installed but cannot be imported
ABSENT = "import sys\nsys.modules.update({names})\n"  # not installed: import fails, find_spec() is None


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("broken botocore and boto3", "pip install"),
        ("absent botocore and boto3", "pip install"),
        ("absent boto3", "pip install boto3"),
    ],
)
def test_missing_s3_libraries_stop_the_run_naming_what_to_install(
    tmp_path: Path, s3: S3Server, bucket: str, origin: Origin, case: str, needle: str
) -> None:
    fake = tmp_path / "fake-site"
    fake.mkdir()
    if case.startswith("broken"):
        for name in ("botocore", "boto3"):
            (fake / name).mkdir()
            (fake / name / "__init__.py").write_text(BROKEN)
    else:
        names = ("boto3",) if case == "absent boto3" else ("botocore", "boto3")
        hidden = {n: None for n in names}
        (fake / "sitecustomize.py").write_text(ABSENT.format(names=hidden))
    fetch = S3Fetch(tmp_path, s3, bucket)
    fetch.pythonpath_first = fake
    origin.reset_stats()
    run = fetch(listing(origin, SMALL[:2]))
    assert_cannot_start(run, origin, needle)
    if "boto3" in case:
        assert "boto3" in run.log
    assert s3.client().list_objects_v2(Bucket=bucket)["KeyCount"] == 0


# --------------------------------------------------------------------------- throughput, for the record


def crawl_seconds(run: Run) -> float:
    """The crawl's own time from fetcher's summary line (without interpreter start-up)."""
    found = re.search(r"fetcher summary: \d+ URLs in ([\d.]+) s", run.log)
    assert found, run.log[-4000:]
    return float(found.group(1))


def test_throughput_local_vs_s3(tmp_path: Path, s3: S3Server, bucket: str, origin: Origin) -> None:
    """Not a speed assertion: prints both rates for the record (pytest -s shows the line)."""
    files = [Gen(f"tp/{i:02d}.bin", 4 * MiB) for i in range(20)]
    text = listing(origin, files)
    total = sum(f.size for f in files)
    rates = {}
    for name in ("local", "s3"):
        (tmp_path / name).mkdir()
        fetch = Fetch(tmp_path / name) if name == "local" else S3Fetch(tmp_path / name, s3, bucket)
        started = time.monotonic()
        run = fetch(text)
        wall = time.monotonic() - started
        assert run.returncode == 0, run.log[-4000:]
        assert "20 downloaded, 0 up to date, 0 failed" in run.log
        rates[name] = (total / 1e6 / crawl_seconds(run), total / 1e6 / wall)
    assert len(S3Fetch(tmp_path / "s3", s3, bucket).keys()) == len(files) + 1
    print(
        f"\nS3 upload: {rates['s3'][0]:.1f} MB/s vs local {rates['local'][0]:.1f} MB/s "
        f"({len(files)} x 4 MiB, crawl time from the summary; whole processes: "
        f"S3 {rates['s3'][1]:.1f} MB/s, local {rates['local'][1]:.1f} MB/s)"
    )
