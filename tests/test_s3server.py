"""Self-test of tests/s3.py: the SeaweedFS S3 server the S3 integration tests run against."""

from __future__ import annotations

import hashlib
import io
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("boto3")
from boto3.s3.transfer import TransferConfig
from botocore import UNSIGNED
from botocore.exceptions import ClientError

from tests.s3 import S3Server, weed_binary

MiB = 1024 * 1024
BUCKET = "selftest"
KEY = "dir/big object.bin"  # a space, to exercise percent-encoding through the proxy
SIZE = 20 * MiB
METADATA = {"sha256": "to-be-filled", "origin": "test"}


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    try:
        weed_binary()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    with S3Server().start() as server:
        yield server


@pytest.fixture(scope="module")
def body(s3: S3Server) -> bytes:
    """A 20 MiB object uploaded with a 4-part multipart upload."""
    data = os.urandom(SIZE)
    s3.create_bucket(BUCKET)
    s3.reset_counts()
    s3.client().upload_fileobj(
        io.BytesIO(data),
        BUCKET,
        KEY,
        ExtraArgs={"Metadata": {**METADATA, "sha256": hashlib.sha256(data).hexdigest()}},
        Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4),
    )
    # CreateMultipartUpload + CompleteMultipartUpload are POSTs, UploadPart is a PUT.
    assert s3.request_counts() == {"POST": 2, "PUT": 4}
    return data


def test_weed_binary_is_executable() -> None:
    try:
        path = Path(weed_binary())
    except RuntimeError as exc:
        pytest.skip(str(exc))
    assert path.name == "weed" and os.access(path, os.X_OK)


def test_endpoint(s3: S3Server) -> None:
    assert s3.endpoint_url.startswith("http://127.0.0.1:")
    assert s3.region == "us-east-1"
    assert s3.startup_seconds is not None and s3.startup_seconds < 30


def test_head_reports_size_and_metadata(s3: S3Server, body: bytes) -> None:
    head = s3.client().head_object(Bucket=BUCKET, Key=KEY)
    assert head["ContentLength"] == SIZE
    assert head["Metadata"] == {**METADATA, "sha256": hashlib.sha256(body).hexdigest()}
    assert head["ETag"].strip('"').endswith("-4")  # multipart ETag: 4 parts


def test_ranged_get_across_a_part_boundary(s3: S3Server, body: bytes) -> None:
    start, end = 5 * MiB - 10, 5 * MiB + 9
    resp = s3.client().get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={start}-{end}")
    assert resp["ContentRange"] == f"bytes {start}-{end}/{SIZE}"
    assert resp["Body"].read() == body[start : end + 1]


def test_presigned_url_works_with_plain_http(s3: S3Server, body: bytes) -> None:
    url = s3.client().generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": KEY}, ExpiresIn=300)
    request = urllib.request.Request(url, headers={"Range": "bytes=0-99"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 206
        assert resp.read() == body[:100]


def test_wrong_credentials_are_refused(s3: S3Server, body: bytes) -> None:
    cases = {
        "wrong secret": s3.client(secret_key="not-the-secret"),
        "unknown key": s3.client(access_key="not-a-key"),
        "anonymous": s3.client(signature_version=UNSIGNED),
    }
    for name, client in cases.items():
        calls = {
            "GetObject": lambda c=client: c.get_object(Bucket=BUCKET, Key=KEY)["Body"].read(),
            "HeadObject": lambda c=client: c.head_object(Bucket=BUCKET, Key=KEY),
            "PutObject": lambda c=client: c.put_object(Bucket=BUCKET, Key="intruder", Body=b"x"),
        }
        for operation, call in calls.items():
            with pytest.raises(ClientError) as info:
                call()
            assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403, (name, operation)
    assert s3.client().list_objects_v2(Bucket=BUCKET)["KeyCount"] == 1


def test_request_counts_tell_head_from_get(s3: S3Server, body: bytes) -> None:
    client = s3.client()
    s3.reset_counts()
    assert s3.request_counts() == {} and s3.body_bytes_sent() == 0

    client.head_object(Bucket=BUCKET, Key=KEY)
    assert s3.request_counts() == {"HEAD": 1}
    assert s3.body_bytes_sent() == 0

    assert client.get_object(Bucket=BUCKET, Key=KEY)["Body"].read() == body
    assert s3.request_counts() == {"HEAD": 1, "GET": 1}
    assert s3.count_requests("get", bucket=BUCKET) == 1
    assert s3.body_bytes_sent() == SIZE
    assert [(r.method, r.bucket, r.key) for r in s3.requests()] == [("HEAD", BUCKET, KEY), ("GET", BUCKET, KEY)]

    s3.reset_counts()
    assert s3.request_counts() == {} and s3.body_bytes_sent() == 0


def test_stop_leaves_nothing_behind() -> None:
    try:
        weed_binary()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    server = S3Server().start()
    proc, tmp = server._proc, server._tmp
    assert proc is not None and tmp is not None and tmp.is_dir()
    grpc_ports = [server.ports[f"{name}_grpc"] for name in ("master", "volume", "filer", "s3")]
    server.stop()
    assert proc.poll() is not None
    assert not tmp.exists()
    assert not [p for port in grpc_ports for p in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock")]
    with pytest.raises(OSError):
        urllib.request.urlopen(server.endpoint_url, timeout=2)
    server.stop()  # idempotent
