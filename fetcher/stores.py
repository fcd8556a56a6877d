"""Where finished files go: a local folder, or a remote store through
Scrapy's own store classes (``S3FilesStore`` and its AWS_* settings).

Bodies always stream to a local ``.part`` first: in the store itself for a
local folder, in a spool folder for a remote store, from which the verified
file is uploaded (multipart for large files, by boto3's managed transfer) and
then removed. So resuming works the same for both, and the spool holds at
most the files in flight.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scrapy.pipelines.files import FSFilesStore, S3FilesStore

from fetcher import settings as defaults
from fetcher.exceptions import StartupError
from fetcher.naming import resolve_in_store

if TYPE_CHECKING:
    from scrapy.settings import BaseSettings

#: Object metadata fetcher writes on every upload: a HEAD tells size and digest without a GET.
META_DIGEST = "fetcher-digest"  # "<algorithm>:<hex>"
META_SIZE = "fetcher-size"


@dataclass(frozen=True, slots=True)
class RemoteObject:
    """What a HEAD of an uploaded object says."""

    size: int
    algorithm: str | None
    checksum: str | None


class LocalTarget:
    """FILES_STORE is a local folder: files are written in place; records in ``<store>/.fetcher``."""

    def __init__(self, basedir: Path) -> None:
        self.basedir = basedir
        self.state_default = basedir / ".fetcher"

    def local_path(self, path: str) -> Path:
        """Where the body of *path* is written (ValueError for a path leaving the store)."""
        return resolve_in_store(self.basedir, path)

    def describe(self) -> str:
        return str(self.basedir)


class S3Target:
    """FILES_STORE is ``s3://bucket/prefix``: Scrapy's S3FilesStore gives the
    client (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_REGION_NAME, ...), and
    FILES_STORE_S3_ACL; boto3's transfer manager does the multipart uploads."""

    def __init__(self, store: S3FilesStore, uri: str, spool: Path, state: Path, multipart_threshold: int) -> None:
        try:
            from boto3.s3.transfer import S3Transfer, TransferConfig  # noqa: PLC0415 - only for S3 stores
        except ImportError as exc:
            raise StartupError(f"FILES_STORE={uri} needs boto3: pip install boto3") from exc
        self.store = store
        self.uri = uri
        self.bucket = store.bucket
        self.prefix = store.prefix if not store.prefix or store.prefix.endswith("/") else store.prefix + "/"
        self.state_default = state
        self.spool = spool
        config = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_threshold)
        self._transfer = S3Transfer(client=store.s3_client, config=config)

    @classmethod
    def from_uri(cls, uri: str, store: Any, settings: BaseSettings) -> S3Target:
        spool = settings.get("FETCHER_SPOOL") or Path(tempfile.gettempdir()) / "fetcher-spool" / _slug(uri)
        state = Path(os.path.expanduser(os.environ.get("XDG_STATE_HOME") or "~/.local/state")) / "fetcher" / _slug(uri)
        threshold = settings.getint("FETCHER_MULTIPART_THRESHOLD", defaults.FETCHER_MULTIPART_THRESHOLD)
        return cls(store, uri, Path(spool), state, threshold)

    def local_path(self, path: str) -> Path:
        return resolve_in_store(self.spool, path)

    def describe(self) -> str:
        return self.uri

    def key(self, path: str) -> str:
        return self.prefix + path

    # -- blocking calls: the pipeline runs them in a thread

    def check(self) -> None:
        """Fail at start on a bucket that cannot be reached or credentials that do not work."""
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        try:
            self.store.s3_client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (BotoCoreError, ClientError) as exc:
            raise StartupError(f"cannot use FILES_STORE={self.uri}: {exc} (check AWS_ENDPOINT_URL, "
                               "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION_NAME)") from exc

    def head(self, path: str) -> RemoteObject | None:
        from botocore.exceptions import ClientError  # noqa: PLC0415

        try:
            head = self.store.s3_client.head_object(Bucket=self.bucket, Key=self.key(path))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        meta = head.get("Metadata") or {}
        algorithm, _, checksum = (meta.get(META_DIGEST) or "").partition(":")
        return RemoteObject(int(head["ContentLength"]), algorithm or None, checksum or None)

    def upload(self, local: Path, path: str, size: int, algorithm: str, checksum: str) -> None:
        extra: dict[str, Any] = {
            "Metadata": {META_DIGEST: f"{algorithm}:{checksum}", META_SIZE: str(size)},
            "ACL": self.store.POLICY,
        }
        if cache_control := self.store.HEADERS.get("Cache-Control"):
            extra["CacheControl"] = cache_control
        self._transfer.upload_file(str(local), self.bucket, self.key(path), extra_args=extra)

    def upload_report(self, local: Path, name: str) -> None:
        self._transfer.upload_file(str(local), self.bucket, self.key(name),
                                   extra_args={"ContentType": "application/x-ndjson"})


Target = LocalTarget | S3Target


def target_for(store: Any, uri: str, settings: BaseSettings) -> Target:
    """The target for Scrapy's store object, or a StartupError saying what is missing."""
    if isinstance(store, FSFilesStore):
        return LocalTarget(Path(store.basedir))
    if isinstance(store, S3FilesStore):
        return S3Target.from_uri(uri, store, settings)
    raise StartupError(f"FILES_STORE={uri}: fetcher streams to local folders and s3:// stores, "
                       f"not to {type(store).__name__}")


def _slug(uri: str) -> str:
    """A folder name for a store URI: readable, unique."""
    readable = "".join(c if c.isalnum() or c in "-._" else "_" for c in uri.split("://", 1)[-1])[:60]
    return f"{readable}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}"
