"""Where finished files go: a local folder, or a remote store through Scrapy's
own store classes and their settings (``S3FilesStore``: AWS_*;
``GCSFilesStore``: GCS_PROJECT_ID, FILES_STORE_GCS_ACL; ``FTPFilesStore``:
FTP_USER, FTP_PASSWORD, FEED_STORAGE_FTP_ACTIVE).

Bodies always stream to a local ``.part`` first: in the store itself for a
local folder, in a spool folder for a remote store, from which the verified
file is uploaded (multipart or resumable for large files) and then removed.
So resuming works the same for every store, and the spool holds at most the
files in flight. A remote store's records live in a local state folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from ftplib import FTP, error_perm
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from scrapy.exceptions import NotConfigured
from scrapy.pipelines.files import (
    FSFilesStore,
    FTPFilesStore,
    GCSFilesStore,
    S3FilesStore,
)
from scrapy.utils.ftp import ftp_makedirs_cwd

from fetcher.exceptions import StartupError
from fetcher.redact import safe_url
from fetcher.store.naming import resolve_in_store

if TYPE_CHECKING:
    from scrapy.settings import BaseSettings

    from fetcher.config import Config

#: Object metadata fetcher writes on every upload (S3, GCS): a HEAD tells size and digest without a GET.
META_DIGEST = "fetcher-digest"  # "<algorithm>:<hex>"
META_SIZE = "fetcher-size"
REPORT_TYPE = "application/x-ndjson"  # the uploaded manifest.jsonl


@dataclass(frozen=True, slots=True)
class RemoteObject:
    """What a HEAD of an uploaded object says (no digest: none was stored with it)."""

    size: int
    algorithm: str | None
    checksum: str | None

    @classmethod
    def from_metadata(cls, size: int, meta: dict[str, str] | None) -> RemoteObject:
        algorithm, _, checksum = ((meta or {}).get(META_DIGEST) or "").partition(":")
        return cls(size, algorithm or None, checksum or None)


def _metadata(size: int, algorithm: str, checksum: str) -> dict[str, str]:
    return {META_DIGEST: f"{algorithm}:{checksum}", META_SIZE: str(size)}


class LocalTarget:
    """FILES_STORE is a local folder: files are written in place; records in ``<store>/.fetcher``."""

    def __init__(self, basedir: Path) -> None:
        self.basedir = basedir
        self.state_default = basedir / ".fetcher"
        self._root = basedir.resolve()  # once: a realpath per file is measurable on big lists
        self._dirs: set[str] = set()  # folders of the store checked already (see resolve_in_store)

    def local_path(self, path: str) -> Path:
        """Where the body of *path* is written (ValueError for a path leaving the store)."""
        return resolve_in_store(self._root, path, resolved=True, known_dirs=self._dirs)

    def locate(self, path: str) -> tuple[Path, bool]:
        """local_path, and whether a folder stands there now: local_path looked at each part of
        the path that it did not know as a folder already, so only a known one is looked at again."""
        final = self.local_path(path)
        return final, str(final) in self._dirs and final.is_dir()

    def prune(self, folder: Path) -> None:
        """Remove *folder* (from local_path) and its parents while they are empty, never the store itself."""
        while folder != self._root and self._root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            self._dirs.discard(str(folder))  # checked again if it comes back (it may come back a link)
            folder = folder.parent

    def describe(self) -> str:
        return str(self.basedir)


class RemoteTarget(ABC):
    """A remote FILES_STORE, wrapping Scrapy's store object for its settings.

    What is shared: the spool (bodies are written and verified there, then
    uploaded) and the local state folder, both named after the store. What a
    store adds: ``check`` at start, ``head`` to skip finished files without a
    GET, ``upload``. The blocking calls run in a thread (the pipeline's job).
    """

    #: Scrapy's store class this target wraps.
    STORE: ClassVar[type]
    #: What FILES_STORE looks like, and pip's name for the library Scrapy's store needs,
    #: for the "cannot start" messages.
    FORM: ClassVar[str]
    LIBRARY: ClassVar[str | None] = None
    #: What to check when the store cannot be used.
    SETTINGS: ClassVar[str]
    #: Whether ``head`` reports the digest fetcher stored with an object. Where
    #: not (FTP), the size recorded in the store's index vouches for the object.
    OBJECT_DIGESTS: ClassVar[bool] = True

    def __init__(self, store: Any, uri: str, config: Config, settings: BaseSettings) -> None:
        self.store = store
        self.uri = uri
        name = _slug(self.describe())  # never a password in a folder name
        state_home = os.path.expanduser(os.environ.get("XDG_STATE_HOME") or "~/.local/state")
        self.state_default = Path(state_home) / "fetcher" / name
        # Bodies wait for their upload in the user's private state folder (made 0700 by the
        # records), never in a guessable folder of the shared temporary directory.
        self.spool = Path(config.spool) if config.spool else Path(config.state_dir or self.state_default) / "spool"
        self.part_size = config.multipart_threshold

    def local_path(self, path: str) -> Path:
        """Where the body of *path* is spooled (ValueError for a path leaving the spool)."""
        return resolve_in_store(self.spool, path)

    def key(self, path: str) -> str:
        """The object name of *path*: under the store's prefix, as a folder."""
        return _folder(self.store.prefix) + path

    def describe(self) -> str:
        return safe_url(self.uri)

    def check(self) -> None:
        """Fail at start, in one line, on a store that cannot be reached or used."""
        try:
            self._probe()
        except Exception as exc:  # every client raises its own kinds; all mean "cannot start"
            raise _unusable(self.describe(), type(self), exc) from exc

    @abstractmethod
    def _probe(self) -> None:
        """Raise unless the store takes uploads (credentials, bucket or folder)."""

    @abstractmethod
    def head(self, path: str) -> RemoteObject | None:
        """The object at *path*, or None when there is none."""

    @abstractmethod
    def upload(self, local: Path, path: str, size: int, algorithm: str, checksum: str) -> None:
        """Store the verified file *local* as *path*, with its digest where the store keeps metadata."""

    @abstractmethod
    def upload_report(self, local: Path, name: str) -> None:
        """Store a report (the manifest) as *name* beside the files."""


class S3Target(RemoteTarget):
    """FILES_STORE is ``s3://bucket/prefix``: Scrapy's S3FilesStore gives the
    client (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_REGION_NAME, ...), and
    FILES_STORE_S3_ACL; boto3's transfer manager does the multipart uploads."""

    STORE = S3FilesStore
    FORM = "s3://bucket/prefix"
    LIBRARY = "boto3"
    SETTINGS = "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION_NAME"

    def __init__(self, store: S3FilesStore, uri: str, config: Config, settings: BaseSettings) -> None:
        try:
            from boto3.s3.transfer import S3Transfer, TransferConfig  # noqa: PLC0415 - only for S3 stores
        except ImportError as exc:
            raise StartupError(f"FILES_STORE={uri} needs boto3: pip install boto3") from exc
        super().__init__(store, uri, config, settings)
        self.bucket = store.bucket
        parts = TransferConfig(multipart_threshold=self.part_size, multipart_chunksize=self.part_size)
        self._transfer = S3Transfer(client=store.s3_client, config=parts)

    def _probe(self) -> None:
        self.store.s3_client.list_objects_v2(Bucket=self.bucket, Prefix=self.key(""), MaxKeys=1)

    def head(self, path: str) -> RemoteObject | None:
        from botocore.exceptions import ClientError  # noqa: PLC0415

        try:
            head = self.store.s3_client.head_object(Bucket=self.bucket, Key=self.key(path))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return RemoteObject.from_metadata(int(head["ContentLength"]), head.get("Metadata"))

    def upload(self, local: Path, path: str, size: int, algorithm: str, checksum: str) -> None:
        extra: dict[str, Any] = {"Metadata": _metadata(size, algorithm, checksum), "ACL": self.store.POLICY}
        if cache_control := self.store.HEADERS.get("Cache-Control"):
            extra["CacheControl"] = cache_control
        self._transfer.upload_file(str(local), self.bucket, self.key(path), extra_args=extra)

    def upload_report(self, local: Path, name: str) -> None:
        self._transfer.upload_file(str(local), self.bucket, self.key(name), extra_args={"ContentType": REPORT_TYPE})


class GCSTarget(RemoteTarget):
    """FILES_STORE is ``gs://bucket/prefix``: Scrapy's GCSFilesStore gives the
    bucket (GCS_PROJECT_ID, the environment's Google credentials) and the ACL
    (FILES_STORE_GCS_ACL). google-cloud-storage uploads a file above 8 MiB as a
    resumable upload in FETCHER_MULTIPART_THRESHOLD chunks, each one retried."""

    STORE = GCSFilesStore
    FORM = "gs://bucket/prefix"
    LIBRARY = "google-cloud-storage"
    SETTINGS = "GCS_PROJECT_ID, GOOGLE_APPLICATION_CREDENTIALS, and that the bucket exists"
    _CHUNK = 256 * 1024  # resumable chunks are multiples of this

    def __init__(self, store: GCSFilesStore, uri: str, config: Config, settings: BaseSettings) -> None:
        super().__init__(store, uri, config, settings)
        self.bucket = store.bucket
        self.chunk_size = max(self._CHUNK, self.part_size // self._CHUNK * self._CHUNK)

    def _probe(self) -> None:
        # Scrapy's store only logs missing permissions; without them every file would fail or be
        # fetched again. (A missing bucket is a 404 here; bucket.exists() would need storage.buckets.get,
        # which an account that may only write objects lacks.)
        wanted = {"storage.objects.get", "storage.objects.create"}
        if missing := wanted - set(self.bucket.test_iam_permissions(sorted(wanted))):
            raise PermissionError(f"no {' and '.join(sorted(missing))} permission on bucket {self.bucket.name}")

    def head(self, path: str) -> RemoteObject | None:
        blob = self.bucket.get_blob(self.key(path))
        return None if blob is None else RemoteObject.from_metadata(int(blob.size), blob.metadata)

    def upload(self, local: Path, path: str, size: int, algorithm: str, checksum: str) -> None:
        blob = self.bucket.blob(self.key(path), chunk_size=self.chunk_size)
        blob.cache_control = self.store.CACHE_CONTROL
        blob.metadata = _metadata(size, algorithm, checksum)
        blob.upload_from_filename(str(local), predefined_acl=self.store.POLICY)

    def upload_report(self, local: Path, name: str) -> None:
        self.bucket.blob(self.key(name)).upload_from_filename(str(local), content_type=REPORT_TYPE)


class FTPTarget(RemoteTarget):
    """FILES_STORE is ``ftp://user:password@host:port/base/path``: Scrapy's
    FTPFilesStore parses it (FTP_USER, FTP_PASSWORD when the URI has none;
    FEED_STORAGE_FTP_ACTIVE for active mode). Uploads stream from the spool,
    making missing folders. FTP keeps no object metadata: ``head`` is a SIZE."""

    STORE = FTPFilesStore
    FORM = "ftp://user:password@host:port/path"
    SETTINGS = ("FTP_USER, FTP_PASSWORD, the host and port (both required) in "
                "ftp://user:password@host:port/path, FEED_STORAGE_FTP_ACTIVE")
    OBJECT_DIGESTS = False

    def __init__(self, store: FTPFilesStore, uri: str, config: Config, settings: BaseSettings) -> None:
        super().__init__(store, uri, config, settings)
        self.timeout = settings.getfloat("DOWNLOAD_TIMEOUT") or None  # a silent server must not hang a thread

    def key(self, path: str) -> str:
        return f"{self.store.basedir}/{path}"

    @contextlib.contextmanager
    def _session(self) -> Iterator[FTP]:
        """A logged-in connection, closed after use (one per call: calls run in many threads)."""
        with FTP(timeout=self.timeout) as ftp:
            ftp.connect(self.store.host, self.store.port)
            ftp.login(self.store.username, self.store.password)
            ftp.set_pasv(not self.store.USE_ACTIVE_MODE)
            yield ftp

    def _probe(self) -> None:
        with self._session() as ftp:
            ftp_makedirs_cwd(ftp, self.store.basedir or "/")

    def head(self, path: str) -> RemoteObject | None:
        with self._session() as ftp:
            ftp.voidcmd("TYPE I")  # SIZE counts bytes only in binary mode
            try:
                size = ftp.size(self.key(path))
            except error_perm as exc:
                if str(exc).startswith("550"):  # no such file
                    return None
                raise
        return None if size is None else RemoteObject(size, None, None)

    def upload(self, local: Path, path: str, size: int, algorithm: str, checksum: str) -> None:
        self._store(local, self.key(path))

    def upload_report(self, local: Path, name: str) -> None:
        self._store(local, self.key(name))

    def _store(self, local: Path, remote: str) -> None:
        folder, name = posixpath.split(remote)
        with self._session() as ftp, local.open("rb") as body:
            try:
                ftp_makedirs_cwd(ftp, folder)
            except error_perm:  # another upload made one of the folders meanwhile: the rest now
                ftp_makedirs_cwd(ftp, folder)
            ftp.storbinary(f"STOR {name}", body)


Target = LocalTarget | RemoteTarget

_SCHEMES: dict[str, type[RemoteTarget]] = {"s3": S3Target, "gs": GCSTarget, "ftp": FTPTarget}


def target_for(store: Any, uri: str, config: Config, settings: BaseSettings) -> Target:
    """The target for Scrapy's store object, or a StartupError saying what is missing."""
    if isinstance(store, FSFilesStore):
        return LocalTarget(Path(store.basedir))
    for target_class in _SCHEMES.values():
        if isinstance(store, target_class.STORE):
            return target_class(store, uri, config, settings)
    raise StartupError(f"FILES_STORE={safe_url(uri)}: fetcher streams to local folders, s3://, gs:// and "
                       f"ftp:// stores, not to {type(store).__name__}")


def store_error(uri: str, exc: Exception) -> StartupError:
    """Why Scrapy could not make its store object for *uri*, in one line that says what to do
    (stock FilesPipeline disables itself quietly instead, and doing nothing is worse)."""
    shown = safe_url(uri)
    target_class = _SCHEMES.get(uri.partition("://")[0] if "://" in uri else "")
    if isinstance(exc, (NotConfigured, ImportError)):
        hint = f"; pip install {target_class.LIBRARY}" if target_class and target_class.LIBRARY else ""
        return StartupError(f"FILES_STORE={shown!r} cannot be used: {exc}{hint}")
    if isinstance(exc, (KeyError, ValueError)):  # an unknown scheme, an s3:// or gs:// URI with no bucket
        form = f" (write it as {target_class.FORM})" if target_class else ""
        return StartupError(f"FILES_STORE={shown!r} is not a store fetcher can use: {exc}{form}")
    return _unusable(shown, target_class, exc)


def _unusable(shown: str, target_class: type[RemoteTarget] | None, exc: Exception) -> StartupError:
    hint = f" (check {target_class.SETTINGS})" if target_class else ""
    detail = str(exc) or f"Scrapy's store refused it ({type(exc).__name__})"  # FTPFilesStore asserts
    return StartupError(f"cannot use FILES_STORE={shown}: {detail}{hint}")


def _folder(prefix: str) -> str:
    """A key prefix that is a folder: ``a/b`` and ``a/b/`` both put files under ``a/b/``."""
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _slug(uri: str) -> str:
    """A folder name for a store URI: readable, unique."""
    readable = "".join(c if c.isalnum() or c in "-._" else "_" for c in uri.split("://", 1)[-1])[:60]
    return f"{readable}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}"
