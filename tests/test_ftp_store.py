"""FILES_STORE=ftp://... (and gs://) end to end: real ``scrapy crawl fetch`` runs against
the test origin and a real FTP server (pyftpdlib) on 127.0.0.1.

FTP keeps no object metadata, so a rerun trusts an object whose size (an FTP SIZE) is
the one the store's records hold for its URL; these tests check that it reads no object
back (no RETR) and takes no byte from the origin. One server for the module; every test
has its own folder on it, and its own state and spool folders under tmp_path.

The gs:// tests at the end run against gcp-storage-emulator, a GCS JSON API emulator
from PyPI, on 127.0.0.1 (google-cloud-storage goes there with STORAGE_EMULATOR_HOST).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pyftpdlib", reason="the FTP store tests need pyftpdlib (pip install -e '.[test]')")

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer

from tests.conftest import Fetch, Run
from tests.origin import Gen, Origin

MiB = 1024 * 1024
USER, PASSWORD = "mirror", "pw-7c1e-secret"
_folders = itertools.count(1)


# --------------------------------------------------------------------------- the FTP server


class FTPd:
    """pyftpdlib serving *home* to one user on 127.0.0.1 (passive ports there too), in a
    thread; ``commands`` is every command it received, in order, as (verb, argument)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.commands: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        authorizer = DummyAuthorizer()
        authorizer.add_user(USER, PASSWORD, str(home), perm="elradfmwMT")
        record = self._record

        class Handler(FTPHandler):
            def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
                record(cmd, arg)
                super().pre_process_command(line, cmd, arg)

        Handler.authorizer = authorizer
        Handler.banner = "fetcher test FTP server"
        logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
        self.server = FTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self.server.address[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ftpd", daemon=True)

    def _record(self, cmd: str, arg: str) -> None:
        with self._lock:
            self.commands.append((cmd, arg))

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.server.serve_forever(timeout=0.05, blocking=False, handle_exit=False)
        self.server.close_all()

    def __enter__(self) -> FTPd:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def reset_commands(self) -> None:
        with self._lock:
            self.commands.clear()

    def verbs(self, *names: str) -> list[tuple[str, str]]:
        with self._lock:
            return [c for c in self.commands if c[0] in names]


@pytest.fixture(scope="module")
def ftpd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FTPd]:
    with FTPd(tmp_path_factory.mktemp("ftp-home")) as server:
        yield server


# --------------------------------------------------------------------------- runs and files


class StoreFetch(Fetch):
    """``scrapy crawl fetch`` with FILES_STORE=*uri*, its state and spool under cwd."""

    def __init__(self, cwd: Path, uri: str, **settings: str) -> None:
        super().__init__(cwd)
        self.uri = uri
        self.state = cwd / "state"
        self.spool = cwd / "spool"
        self.settings = {"FETCHER_STATE_DIR": str(self.state), "FETCHER_SPOOL": str(self.spool), **settings}
        self.extra_env: dict[str, str] = {}

    def command(self, *args: str, settings: dict[str, Any] | None = None) -> list[str]:
        base = {"FILES_STORE": self.uri, **self.settings}
        return super().command(*args, settings={**base, **(settings or {})})

    def env(self) -> dict[str, str]:
        env = super().env()
        env["XDG_STATE_HOME"] = str(self.cwd / "xdg-state")
        env["TMPDIR"] = str(self.cwd / "tmp")
        (self.cwd / "tmp").mkdir(exist_ok=True)
        for name in [n for n in env if n.startswith(("GOOGLE_", "STORAGE_EMULATOR", "FTP_"))]:
            del env[name]  # only the test says where the store is
        return {**env, **self.extra_env}

    def local_manifest(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.state / "manifest.jsonl").read_text().splitlines()]

    def spool_files(self) -> list[Path]:
        return [p for p in self.spool.rglob("*") if p.is_file()] if self.spool.exists() else []


class FTPFetch(StoreFetch):
    """A run into a fresh folder of the FTP server: ftp://mirror:pw@127.0.0.1:<port>/<folder>."""

    def __init__(self, cwd: Path, ftpd: FTPd, *, password: str = PASSWORD, **settings: str) -> None:
        self.folder = f"t{next(_folders)}/files"
        super().__init__(cwd, f"ftp://{USER}:{password}@127.0.0.1:{ftpd.port}/{self.folder}", **settings)
        self.ftpd = ftpd

    def stored(self, path: str) -> Path:
        return self.ftpd.home / self.folder / path

    def remote_manifest(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stored("manifest.jsonl").read_text().splitlines()]


SMALL = [Gen("small/a.bin", 10 * 1024), Gen("small/b.txt", 1), Gen("c.iso", 3 * MiB), Gen("empty.bin", 0)]
BIG = Gen("big/disk.img", 24 * MiB)


def listing(origin: Origin, files: list[Gen]) -> str:
    return "".join(f"{f.url(origin)}\n" for f in files)


def by_url(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["url"]: r for r in records}


def file_digest(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def assert_cannot_start(run: Run, origin: Origin, *needles: str) -> str:
    """The run stopped before the list, with one "Cannot start" line and no traceback."""
    assert run.returncode == 1, run.log[-4000:]
    lines = [x for x in run.log.splitlines() if "ERROR: Cannot start: " in x]
    assert lines, run.log[-4000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in run.stderr + run.stdout, run.log[-4000:]
    assert origin.stats.hits == 0 and origin.stats.connections == 0
    return lines[0]


# --------------------------------------------------------------------------- FTP: the first run and reruns


@dataclass
class Mirrored:
    """An FTP store after its first run: SMALL and one 24 MiB file uploaded."""

    fetch: FTPFetch
    files: list[Gen]
    list_text: str
    run: Run
    commands: list[tuple[str, str]]


@pytest.fixture(scope="module")
def mirrored(ftpd: FTPd, origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Mirrored:
    fetch = FTPFetch(tmp_path_factory.mktemp("ftp-mirrored"), ftpd)
    files = [*SMALL, BIG]
    text = listing(origin, files)
    origin.reset_stats()
    ftpd.reset_commands()
    run = fetch(text)
    return Mirrored(fetch, files, text, run, list(ftpd.commands))


def test_first_run_uploads_every_file(mirrored: Mirrored, origin: Origin) -> None:
    fetch, run = mirrored.fetch, mirrored.run
    assert run.returncode == 0, run.log[-4000:]
    assert "5 downloaded, 0 up to date, 0 failed" in run.log
    for f in mirrored.files:
        assert file_digest(fetch.stored(f.path(origin))) == (f.size, f.digest), f
    uploads = [arg for cmd, arg in mirrored.commands if cmd == "STOR"]
    assert sorted(uploads) == sorted([f.name.rpartition("/")[2] for f in mirrored.files] + ["manifest.jsonl"])
    assert fetch.spool_files() == []
    assert PASSWORD not in run.log


def test_manifest_is_uploaded(mirrored: Mirrored, origin: Origin) -> None:
    fetch = mirrored.fetch
    records = by_url(fetch.remote_manifest())
    assert records == by_url(fetch.local_manifest())
    assert set(records) == {f.url(origin) for f in mirrored.files}
    for f in mirrored.files:
        r = records[f.url(origin)]
        assert r["status"] == "downloaded" and r["error"] is None, r
        assert (r["path"], r["size"], r["algorithm"], r["checksum"]) == (f.path(origin), f.size, "sha256", f.digest)


def test_rerun_is_uptodate_by_size_without_reading_objects(mirrored: Mirrored, origin: Origin, ftpd: FTPd) -> None:
    fetch = mirrored.fetch
    origin.reset_stats()
    ftpd.reset_commands()
    run = fetch(mirrored.list_text)
    assert run.returncode == 0, run.log[-4000:]
    assert "0 downloaded, 5 up to date, 0 failed" in run.log
    assert origin.stats.bytes_sent == 0 and origin.stats.hits == 0
    assert ftpd.verbs("RETR") == []
    assert [arg for _, arg in ftpd.verbs("STOR")] == ["manifest.jsonl"]
    sized = {arg for _, arg in ftpd.verbs("SIZE")}
    assert sized == {f"/{fetch.folder}/{f.path(origin)}" for f in mirrored.files}
    records = by_url(fetch.remote_manifest())
    for f in mirrored.files:  # the digest comes from the records: FTP has none
        r = records[f.url(origin)]
        assert (r["status"], r["size"], r["checksum"]) == ("uptodate", f.size, f.digest), r
    assert fetch.spool_files() == []


def test_deleted_or_changed_objects_are_fetched_again(tmp_path: Path, ftpd: FTPd, origin: Origin) -> None:
    fetch = FTPFetch(tmp_path, ftpd)
    text = listing(origin, SMALL)
    assert fetch(text).returncode == 0
    gone, changed = SMALL[2], SMALL[0]
    fetch.stored(gone.path(origin)).unlink()
    fetch.stored(changed.path(origin)).write_bytes(b"not the file")

    origin.reset_stats()
    again = fetch(text)
    assert again.returncode == 0, again.log[-4000:]
    assert "2 downloaded, 2 up to date, 0 failed" in again.log
    assert dict(origin.stats.snapshot().hits_by_path) == {f"/gen/{f.size}/{f.name}": 1 for f in (gone, changed)}
    for f in (gone, changed):
        assert file_digest(fetch.stored(f.path(origin))) == (f.size, f.digest)
    records = by_url(fetch.remote_manifest())
    assert "missing from the store" in records[gone.url(origin)]["note"]
    assert "12 bytes, recorded 10240" in records[changed.url(origin)]["note"]
    assert {records[f.url(origin)]["status"] for f in SMALL if f not in (gone, changed)} == {"uptodate"}


def test_object_without_a_record_is_fetched_again(tmp_path: Path, ftpd: FTPd, origin: Origin) -> None:
    """Without object metadata only the records can vouch for an object: a lost state folder means a refetch."""
    first = FTPFetch(tmp_path / "first", ftpd)
    (tmp_path / "first").mkdir()
    files = SMALL[:2]
    assert first(listing(origin, files)).returncode == 0
    (tmp_path / "second").mkdir()
    second = StoreFetch(tmp_path / "second", first.uri)  # the same store, another (empty) state folder
    origin.reset_stats()
    run = second(listing(origin, files))
    assert run.returncode == 0, run.log[-4000:]
    assert "2 downloaded, 0 up to date, 0 failed" in run.log
    assert origin.stats.hits == 2
    assert "without a record of this URL" in run.log


def test_settings_give_the_credentials_and_active_mode(tmp_path: Path, ftpd: FTPd, origin: Origin) -> None:
    """FTP_USER/FTP_PASSWORD for a URI without them, FEED_STORAGE_FTP_ACTIVE for PORT
    instead of PASV; and with no FETCHER_STATE_DIR no folder is named with the password."""
    folder = f"t{next(_folders)}/settings"
    fetch = StoreFetch(tmp_path, f"ftp://127.0.0.1:{ftpd.port}/{folder}",
                       FTP_USER=USER, FTP_PASSWORD=PASSWORD, FEED_STORAGE_FTP_ACTIVE="True")
    ftpd.reset_commands()
    run = fetch(listing(origin, SMALL[:2]))
    assert run.returncode == 0, run.log[-4000:]
    assert "2 downloaded, 0 up to date, 0 failed" in run.log
    assert file_digest(ftpd.home / folder / SMALL[0].path(origin)) == (SMALL[0].size, SMALL[0].digest)
    assert ftpd.verbs("PORT", "EPRT") and not ftpd.verbs("PASV", "EPSV")

    url_fetch = FTPFetch(tmp_path / "defaults", ftpd)
    (tmp_path / "defaults").mkdir()
    url_fetch.settings = {}  # the default state and spool folders, under XDG_STATE_HOME and TMPDIR
    run = url_fetch(listing(origin, SMALL[:1]))
    assert run.returncode == 0, run.log[-4000:]
    made = [str(p) for p in (tmp_path / "defaults").rglob("*")]
    assert any("xdg-state" in p and "127.0.0.1" in p for p in made), made
    assert not [p for p in made if PASSWORD in p]
    assert PASSWORD not in run.log


# --------------------------------------------------------------------------- FTP: a store that cannot start


def test_wrong_password_stops_the_run_before_the_list(tmp_path: Path, ftpd: FTPd, origin: Origin) -> None:
    fetch = FTPFetch(tmp_path, ftpd, password="not-the-password")
    origin.reset_stats()
    run = fetch(listing(origin, SMALL[:2]))
    line = assert_cannot_start(run, origin, f"ftp://***@127.0.0.1:{ftpd.port}/{fetch.folder}",
                               "530", "FTP_PASSWORD")
    assert "not-the-password" not in run.log, line
    assert not (ftpd.home / fetch.folder).exists()


def test_unreachable_server_stops_the_run(tmp_path: Path, origin: Origin) -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    fetch = StoreFetch(tmp_path, f"ftp://{USER}:{PASSWORD}@127.0.0.1:{port}/x")
    origin.reset_stats()
    assert_cannot_start(fetch(listing(origin, SMALL[:1])), origin, f"127.0.0.1:{port}", "refused")


def test_uri_without_a_port_stops_the_run(tmp_path: Path, origin: Origin) -> None:
    """Scrapy's FTPFilesStore requires the port (an assert): said in one line, not a traceback."""
    fetch = StoreFetch(tmp_path, f"ftp://{USER}:{PASSWORD}@127.0.0.1/x")
    origin.reset_stats()
    assert_cannot_start(fetch(listing(origin, SMALL[:1])), origin, "ftp://", "host:port")


# --------------------------------------------------------------------------- gs:// (GCS)


def test_gcs_without_its_library_stops_the_run_naming_what_to_install(tmp_path: Path, origin: Origin) -> None:
    fake = tmp_path / "fake-site"
    fake.mkdir()  # google-cloud-storage not installed: its import fails
    (fake / "sitecustomize.py").write_text("import sys\nsys.modules['google.cloud.storage'] = None\n")
    fetch = StoreFetch(tmp_path, "gs://bucket/prefix")
    fetch.extra_env = {"PYTHONPATH": f"{fake}{os.pathsep}{fetch.env()['PYTHONPATH']}"}
    origin.reset_stats()
    assert_cannot_start(fetch(listing(origin, SMALL[:1])), origin, "gs://bucket/prefix",
                        "pip install google-cloud-storage")


class _GCSEmulator:
    """gcp-storage-emulator's API in a thread on 127.0.0.1, logging each request (method, path)."""

    def __init__(self, *buckets: str) -> None:
        from http.server import HTTPServer  # noqa: PLC0415

        from gcp_storage_emulator.handlers import buckets as bucket_api  # noqa: PLC0415
        from gcp_storage_emulator.server import RequestHandler  # noqa: PLC0415
        from gcp_storage_emulator.storage import Storage  # noqa: PLC0415

        self.requests: list[tuple[str, str]] = []
        storage = Storage(use_memory_fs=True)
        for name in buckets:
            bucket_api.create_bucket(name, storage)
        log = self.requests

        class Handler(RequestHandler):
            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                log.append((self.command, self.path))

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
                pass

        self.storage = storage
        self.httpd = HTTPServer(("127.0.0.1", 0), partial(Handler, storage))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="gcs", daemon=True)

    def __enter__(self) -> _GCSEmulator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials  # noqa: PLC0415
        from google.cloud import storage  # noqa: PLC0415

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.url})


@pytest.fixture(scope="module")
def gcs() -> Iterator[_GCSEmulator]:
    pytest.importorskip("google.cloud.storage", reason="gs:// tests need google-cloud-storage")
    pytest.importorskip("gcp_storage_emulator", reason="gs:// tests need gcp-storage-emulator")
    with _GCSEmulator("mirror") as server:
        yield server


class GCSFetch(StoreFetch):
    def __init__(self, cwd: Path, gcs: _GCSEmulator, uri: str = "gs://mirror/files") -> None:
        super().__init__(cwd, uri)
        # The emulator, anonymously; never Google's metadata server or a user's gcloud config.
        self.extra_env = {"STORAGE_EMULATOR_HOST": gcs.url, "NO_GCE_CHECK": "True",
                          "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
                          "CLOUDSDK_CONFIG": str(cwd / "gcloud")}


def test_gcs_store_uploads_with_digests_and_reruns_by_metadata(tmp_path: Path, gcs: _GCSEmulator,
                                                               origin: Origin) -> None:
    fetch = GCSFetch(tmp_path, gcs)
    files = [*SMALL, Gen("big/gcs.img", 20 * MiB)]
    text = listing(origin, files)
    run = fetch(text)
    assert run.returncode == 0, run.log[-4000:]
    assert "5 downloaded, 0 up to date, 0 failed" in run.log
    bucket = gcs.client().bucket("mirror")
    for f in files:
        blob = bucket.get_blob(f"files/{f.path(origin)}")
        assert blob is not None and blob.size == f.size, f
        assert hashlib.sha256(blob.download_as_bytes()).hexdigest() == f.digest
        assert blob.metadata == {"fetcher-digest": f"sha256:{f.digest}", "fetcher-size": str(f.size)}
    big = f"files/{files[-1].path(origin)}"
    resumable = [p for m, p in gcs.requests if m == "PUT" and "upload_id" in p]
    assert len(resumable) == 3, gcs.requests  # 20 MiB in FETCHER_MULTIPART_THRESHOLD (8 MiB) chunks
    remote = [json.loads(x) for x in bucket.blob("files/manifest.jsonl").download_as_text().splitlines()]
    assert by_url(remote) == by_url(fetch.local_manifest())
    assert fetch.spool_files() == []

    bucket.blob(big).delete()
    origin.reset_stats()
    gcs.requests.clear()
    again = fetch(text)
    assert again.returncode == 0, again.log[-4000:]
    assert "1 downloaded, 4 up to date, 0 failed" in again.log
    assert origin.stats.bytes_sent == files[-1].size
    assert not [p for m, p in gcs.requests if m == "GET" and "alt=media" in p], gcs.requests
    records = by_url(fetch.local_manifest())
    assert "missing from the store" in records[files[-1].url(origin)]["note"]


def test_gcs_unknown_bucket_stops_the_run(tmp_path: Path, gcs: _GCSEmulator, origin: Origin) -> None:
    fetch = GCSFetch(tmp_path, gcs, "gs://no-such-bucket/files")
    origin.reset_stats()
    assert_cannot_start(fetch(listing(origin, SMALL[:1])), origin, "gs://no-such-bucket/files", "404",
                        "GOOGLE_APPLICATION_CREDENTIALS")


def test_gcs_without_credentials_stops_the_run(tmp_path: Path, origin: Origin) -> None:
    pytest.importorskip("google.cloud.storage", reason="gs:// tests need google-cloud-storage")
    fetch = StoreFetch(tmp_path, "gs://bucket/files")
    fetch.extra_env = {"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "no-such-key.json"), "NO_GCE_CHECK": "True",
                       "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
                       "CLOUDSDK_CONFIG": str(tmp_path / "gcloud")}
    origin.reset_stats()
    assert_cannot_start(fetch(listing(origin, SMALL[:1])), origin, "gs://bucket/files", "no-such-key.json")


def test_out_cannot_name_the_uploaded_manifest(tmp_path: Path, ftpd: FTPd, origin: Origin) -> None:
    """On a remote store the manifest is uploaded as manifest.jsonl beside the files:
    an entry's out= cannot take that name, and the uploaded manifest stays the records'."""
    fetch = FTPFetch(tmp_path, ftpd)
    hostile, kept = f"{origin.url}/gen/1k/hostile.bin", f"{origin.url}/gen/1k/kept.bin"
    run = fetch(f"{hostile} out=manifest.jsonl\n{kept}\n")
    assert run.returncode == 1, run.log[-4000:]
    records = by_url(fetch.remote_manifest())
    assert records[hostile]["status"] == "failed" and "the store's own" in records[hostile]["error"]
    assert records[kept]["status"] == "downloaded"
