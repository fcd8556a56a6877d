"""fetcher under a real Scrapyd, deployed the way the README's "Scrapyd" section says.

Scrapyd 1.6 runs in a virtualenv of its own, made here with pip from PyPI and kept
under the temporary directory (``fetcher-scrapyd-venv-<hash of the pins>``) so
that later runs reuse it; a lock keeps two runs from sharing it at once. Into it
goes fetcher, installed with pip from a clean copy of the repository, then
``scrapyd-deploy`` (from that venv) sends the egg to a Scrapyd with basic auth on
127.0.0.1, a free port and its own working, eggs, logs and items folders.

The clean copy is the repository's work tree as ``git clone`` would give it once
committed: the files ``git ls-files --cached --others --exclude-standard`` names
(tracked files as they are now, plus untracked files that are not ignored),
committed into a new repository. In CI, which runs in a fresh clone, that is the
clone itself. Deploying must leave ``git status --porcelain`` empty there.

Skipped only when PyPI cannot be reached.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, SCRAPY, Fetch
from tests.origin import Origin, expected_digest
from tests.redis_server import RedisServer

#: Scrapyd's environment, as the README says to make it. setuptools: Scrapyd 1.6 runs eggs through
#: pkg_resources (gone in setuptools 81); fetcher's pyproject needs >= 68 for setup.py bdist_egg.
SCRAPYD_REQUIREMENTS = ("scrapyd==1.6.0", "scrapyd-client==2.0.3", "setuptools>=68,<81")
USERNAME, PASSWORD = "fetcher-test", "s3cret:with%signs"
DEADLINE = 90.0  # seconds for all jobs together; each takes 2-3 s here
MAX_INLINE = 64 * 1024


def _cache_dir() -> Path:
    key = json.dumps([SCRAPYD_REQUIREMENTS, sys.version_info[:2]]).encode()
    return Path(tempfile.gettempdir()) / f"fetcher-scrapyd-venv-{hashlib.sha256(key).hexdigest()[:12]}"


def _clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without what would point Scrapy, Python or Scrapyd elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith(("SCRAPY_", "SCRAPYD_"))}
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=False, cwd=cwd, env=env or _clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def _pip(venv: Path, *args: str, cwd: Path | None = None) -> None:
    """pip install in the venv; skip the module when it failed because PyPI is out of reach."""
    proc = _run([str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", *args], cwd=cwd)
    if proc.returncode == 0:
        return
    with tempfile.TemporaryDirectory() as probe:
        reach = _run([str(venv / "bin" / "pip"), "download", "--no-deps", "--no-cache-dir", "-d", probe,
                      SCRAPYD_REQUIREMENTS[0]], timeout=120)
    if reach.returncode != 0:
        pytest.skip(f"PyPI cannot be reached to install Scrapyd: {reach.stderr.strip()[-300:]}")
    raise AssertionError(f"pip install {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@contextlib.contextmanager
def _scrapyd_venv() -> Iterator[Path]:
    """The cached Scrapyd venv, held under an exclusive lock (fetcher is reinstalled into it each run)."""
    venv = _cache_dir()
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".complete").exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
            _pip(venv, *SCRAPYD_REQUIREMENTS)
            (venv / ".complete").write_text("\n".join(SCRAPYD_REQUIREMENTS) + "\n")
        yield venv


def _clean_copy(dest: Path) -> Path:
    """The work tree as a fresh clone would have it once committed (see the module's docstring)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the work tree is listed too
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot of the work tree"]):
        subprocess.run([*git, *cmd], cwd=dest, check=True, capture_output=True)
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Scrapyd:
    venv: Path
    clone: Path
    workdir: Path
    url: str
    deploy: subprocess.CompletedProcess[str]
    jobs: dict[str, str] = field(default_factory=dict)

    def request(self, path: str, data: dict[str, str | list[str]] | None = None, auth: bool = True) -> bytes:
        body = urllib.parse.urlencode(data, doseq=True).encode() if data is not None else None
        req = urllib.request.Request(self.url + path, data=body)
        if auth:
            token = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())

    def api(self, path: str, data: dict[str, str | list[str]] | None = None) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(self.request(path, data))
        assert answer["status"] == "ok", answer
        return answer

    def schedule(self, name: str, **params: str | list[str]) -> str:
        job: str = self.api("/schedule.json", {"project": "fetcher", "spider": "fetch", **params})["jobid"]
        self.jobs[name] = job
        return job

    @property
    def log(self) -> str:
        """Scrapyd's own log (twistd's output), where a job's exit status shows."""
        return (self.workdir / "scrapyd.log").read_text(errors="replace")

    def end_line(self, job: str, timeout: float = 10) -> str:
        """Scrapyd's "Process finished:" or "Process died: exitstatus=N" line for the job."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log.splitlines():
                if f"job={job!r}" in line and ("Process finished:" in line or "Process died:" in line):
                    return line
            assert time.monotonic() < deadline, f"no end line for {job} in Scrapyd's log:\n{self.log[-5000:]}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def scrapyd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrapyd]:
    base = tmp_path_factory.mktemp("scrapyd")
    clone = _clean_copy(base / "clone")
    with _scrapyd_venv() as venv:
        # README: install fetcher (and so its dependencies) into Scrapyd's environment.
        _pip(venv, str(clone))
        workdir = base / "scrapyd"
        workdir.mkdir()
        port = _free_port()
        (workdir / "scrapyd.conf").write_text(
            "[scrapyd]\n"
            "bind_address = 127.0.0.1\n"
            f"http_port = {port}\n"
            f"username = {USERNAME}\n"
            f"password = {PASSWORD.replace('%', '%%')}\n"
            f"eggs_dir = {workdir / 'eggs'}\n"
            f"logs_dir = {workdir / 'logs'}\n"
            f"items_dir = {workdir / 'items'}\n"
            f"dbs_dir = {workdir / 'dbs'}\n"
            "poll_interval = 0.5\n"
            "max_proc = 4\n"
        )
        # HOME: no ~/.scrapyd.conf of whoever runs the suite (it would override ours).
        env = _clean_env(HOME=str(workdir))
        with open(workdir / "scrapyd.log", "wb") as out:
            proc = subprocess.Popen([str(venv / "bin" / "scrapyd")], cwd=workdir, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_until_up(url, proc, workdir)
            # README: a deploy target of one's own in ~/.config/scrapy.cfg (here XDG_CONFIG_HOME), credentials from
            # the environment through scrapy.cfg's ${SCRAPYD_USERNAME}/${SCRAPYD_PASSWORD}.
            xdg = base / "config"
            xdg.mkdir()
            (xdg / "scrapy.cfg").write_text(f"[deploy:test]\nurl = {url}\n")
            deploy_env = _clean_env(XDG_CONFIG_HOME=str(xdg), SCRAPYD_USERNAME=USERNAME, SCRAPYD_PASSWORD=PASSWORD)
            deploy = _run([str(venv / "bin" / "scrapyd-deploy"), "test"], cwd=clone, env=deploy_env, timeout=120)
            yield Scrapyd(venv, clone, workdir, url, deploy)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], workdir: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "Scrapyd exited:\n" + (workdir / "scrapyd.log").read_text(errors="replace")
        try:
            urllib.request.urlopen(url + "/daemonstatus.json", timeout=2)
        except urllib.error.HTTPError as exc:
            if exc.code == 401:  # up, and asking for credentials
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("Scrapyd did not answer:\n" + (workdir / "scrapyd.log").read_text(errors="replace"))


FILES = [("a.bin", 200 * 1024), ("sub/b.bin", 1024 * 1024), ("c.bin", 3 * 1024)]


@pytest.fixture(scope="module")
def redis_queue(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A queue on a real redis-server, filled with `scrapy enqueue` as the README says."""
    fetch = Fetch(tmp_path_factory.mktemp("enqueue"))
    with RedisServer() as server:
        url = server.url("scrapyd")
        listing = "".join(f"{origin.url}/gen/4k/queued{i}.bin\n" for i in range(20))
        enq = subprocess.run([SCRAPY, "enqueue", url, "-"], input=listing, cwd=fetch.cwd, env=fetch.env(),
                             capture_output=True, text=True, timeout=60)
        assert enq.returncode == 0, enq.stderr
        yield url


@pytest.fixture(scope="module")
def jobs(scrapyd: Scrapyd, origin: Origin, tmp_path_factory: pytest.TempPathFactory,
         redis_queue: str) -> dict[str, dict[str, Any]]:
    """Jobs run side by side: a good list, a list with a 404, -a urls= past 64 KiB, a packaged list."""
    assert scrapyd.deploy.returncode == 0, scrapyd.deploy.stdout + scrapyd.deploy.stderr
    u = origin.url
    origin.texts["scrapyd/good.txt"] = "".join(f"{u}/gen/{size}/{name}\n" for name, size in FILES)
    origin.texts["scrapyd/bad.txt"] = f"{u}/gen/2k/fine.bin\n{u}/status/404\n"
    store = tmp_path_factory.mktemp("scrapyd-store")
    scrapyd.schedule("good", list=f"{u}/text/scrapyd/good.txt", setting=f"FILES_STORE={store}")
    scrapyd.schedule("bad", list=f"{u}/text/scrapyd/bad.txt")  # no FILES_STORE: Scrapyd's working directory
    one = len(f"{u}/gen/1k/inline-00000.bin ")
    big = " ".join(f"{u}/gen/1k/inline-{i:05d}.bin" for i in range(MAX_INLINE // one + 100))
    size = len(big.encode())
    assert MAX_INLINE < size < 100 * 1024, size  # refused by fetcher, yet short enough for one command-line argument
    scrapyd.schedule("big", urls=big)
    scrapyd.schedule("packaged", list="package:example.txt", setting=f"FILES_STORE={store}-packaged")
    scrapyd.schedule("worker", list=redis_queue, setting=f"FILES_STORE={store}-worker")  # a queue worker job
    origin.texts["scrapyd/many.txt"] = "".join(f"{u}/gen/2k/many{i}.bin\n" for i in range(40))
    scrapyd.schedule("processes", list=f"{u}/text/scrapyd/many.txt",
                     setting=[f"FILES_STORE={store}-processes", "FETCHER_WORKERS=2"])  # worker processes, from the egg

    deadline = time.monotonic() + DEADLINE
    wanted = set(scrapyd.jobs.values())
    while True:
        listing = scrapyd.api("/listjobs.json?project=fetcher")
        finished = {j["id"]: j for j in listing["finished"] if j["id"] in wanted}
        if len(finished) == len(wanted):
            break
        assert time.monotonic() < deadline, f"jobs not finished after {DEADLINE} s: {listing}\n{scrapyd.log[-5000:]}"
        time.sleep(0.5)
    return {name: {**finished[job], "store": store} for name, job in scrapyd.jobs.items()}


def _log(scrapyd: Scrapyd, job: dict[str, Any]) -> str:
    return scrapyd.request(job["log_url"]).decode(errors="replace")


def _records(scrapyd: Scrapyd, job: dict[str, Any]) -> list[dict[str, Any]]:
    lines = scrapyd.request(job["items_url"]).decode().splitlines()
    return [json.loads(line) for line in lines]


def test_deploy_from_a_clean_clone_leaves_nothing_behind(scrapyd: Scrapyd) -> None:
    assert scrapyd.deploy.returncode == 0, scrapyd.deploy.stdout + scrapyd.deploy.stderr
    assert '"status": "ok"' in scrapyd.deploy.stdout and '"spiders": 1' in scrapyd.deploy.stdout
    status = _run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=scrapyd.clone)
    assert status.returncode == 0 and status.stdout == "", f"deploying left files in the clone:\n{status.stdout}"
    assert scrapyd.api("/listspiders.json?project=fetcher")["spiders"] == ["fetch"]


def test_basic_auth_is_on(scrapyd: Scrapyd, tmp_path: Path) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        scrapyd.request("/listprojects.json", auth=False)
    assert refused.value.code == 401
    # scrapy.cfg's ${SCRAPYD_USERNAME} stays literal when unset: the deploy is refused, and says so.
    (tmp_path / "scrapy.cfg").write_text(f"[deploy:test]\nurl = {scrapyd.url}\n")
    proc = _run([str(scrapyd.venv / "bin" / "scrapyd-deploy"), "test"], cwd=scrapyd.clone,
                env=_clean_env(XDG_CONFIG_HOME=str(tmp_path)), timeout=120)
    assert proc.returncode == 1 and "Deploy failed (401)" in proc.stderr, proc.stdout + proc.stderr


def test_list_over_http_files_records_and_summary(scrapyd: Scrapyd, jobs: dict[str, dict[str, Any]],
                                                  origin: Origin) -> None:
    job = jobs["good"]
    records = {r["url"]: r for r in _records(scrapyd, job)}
    assert len(records) == len(FILES)
    for name, size in FILES:
        record = records[f"{origin.url}/gen/{size}/{name}"]
        assert record["status"] == "downloaded" and record["size"] == size, record
        assert record["checksum"] == expected_digest(name, size), record
        data = (job["store"] / record["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == expected_digest(name, size), record
    manifest = (job["store"] / "manifest.jsonl").read_text().splitlines()
    assert {json.loads(line)["url"] for line in manifest} == set(records)
    log = _log(scrapyd, job)
    assert re.search(r"fetcher summary: 3 URLs in [\d.]+ s: 3 downloaded, 0 up to date, 0 failed", log), log
    assert "Spider closed (finished)" in log, log
    assert "Process finished:" in scrapyd.end_line(job["id"])


def test_a_failed_url_shows_in_log_records_and_exit_status(scrapyd: Scrapyd, jobs: dict[str, dict[str, Any]],
                                                           origin: Origin) -> None:
    job = jobs["bad"]
    failed = f"{origin.url}/status/404"
    records = {r["url"]: r for r in _records(scrapyd, job)}
    assert records[failed]["status"] == "failed" and records[failed]["http_status"] == 404, records
    assert records[f"{origin.url}/gen/2k/fine.bin"]["status"] == "downloaded", records
    log = _log(scrapyd, job)
    assert f"Failed {failed}: HTTP 404" in log, log
    assert re.search(r"fetcher summary: 2 URLs in [\d.]+ s: 1 downloaded, 0 up to date, 1 failed", log), log
    assert "Spider closed (finished)" in log, log  # Scrapy's reason: the run went through; the URL failed
    # listjobs.json says "finished" all the same: the exit status is only in Scrapyd's own log.
    assert "Process died: exitstatus=1 " in scrapyd.end_line(job["id"])
    # Without -d setting=FILES_STORE=..., the relative default lands in Scrapyd's working directory.
    fine = records[f"{origin.url}/gen/2k/fine.bin"]
    assert (scrapyd.workdir / "downloads" / fine["path"]).stat().st_size == 2048
    assert (scrapyd.workdir / "downloads" / "manifest.jsonl").is_file()


def test_inline_urls_over_64_kib_are_refused_before_any_work(scrapyd: Scrapyd,
                                                            jobs: dict[str, dict[str, Any]]) -> None:
    job = jobs["big"]
    assert job["items_url"] is None  # the crawl never began: no feed
    end = scrapyd.end_line(job["id"])
    assert "Process died: exitstatus=2 " in end, end  # a usage error
    # The reason goes to the job's standard error, which Scrapyd copies into its own log.
    assert re.search(r"error: -a urls= holds [\d,]+ bytes; past 64 KiB give the URLs as a list", scrapyd.log)
    assert "Spider opened" not in _log(scrapyd, job)


def test_inline_urls_refusal_is_in_the_job_log(scrapyd: Scrapyd, jobs: dict[str, dict[str, Any]]) -> None:
    assert "past 64 KiB" in _log(scrapyd, jobs["big"])


def test_a_list_packaged_with_fetcher_is_read_by_a_job(scrapyd: Scrapyd, jobs: dict[str, dict[str, Any]]) -> None:
    """fetcher/lists/example.txt, shipped as package data, read with pkgutil in the job (its URLs
    point at port 8765: whether they download here does not matter, that each has a record does)."""
    urls = {r["url"] for r in _records(scrapyd, jobs["packaged"])}
    assert urls == {"http://127.0.0.1:8765/gen/64k/example/one.bin", "http://127.0.0.1:8765/gen/128k/example/two.bin"}
    assert "fetcher summary: 2 URLs" in _log(scrapyd, jobs["packaged"])


def test_a_job_with_worker_processes_gives_one_items_file(scrapyd: Scrapyd, jobs: dict[str, dict[str, Any]],
                                                         origin: Origin) -> None:
    """FETCHER_WORKERS=2 in a job: the workers run fetcher from the deployed egg, and the job's
    items file and log hold every worker's records, once."""
    records = _records(scrapyd, jobs["processes"])
    assert sorted(r["url"] for r in records) == sorted(f"{origin.url}/gen/2k/many{i}.bin" for i in range(40))
    assert {r["status"] for r in records} == {"downloaded"}
    log = _log(scrapyd, jobs["processes"])
    assert "Downloading with 2 worker processes" in log and log.count("fetcher summary: 40 URLs") == 1, log
    assert "Process finished:" in scrapyd.end_line(jobs["processes"]["id"])


def test_a_queue_worker_job_empties_the_queue(scrapyd: Scrapyd, jobs: dict[str, dict[str, Any]],
                                             origin: Origin) -> None:
    records = _records(scrapyd, jobs["worker"])
    assert len(records) == 20 and {r["status"] for r in records} == {"downloaded"}
    store = Path(f"{jobs['worker']['store']}-worker")
    for i in range(20):
        assert (store / origin.url.removeprefix("http://") / f"gen/4k/queued{i}.bin").stat().st_size == 4096
    assert "Spider closed (finished)" in _log(scrapyd, jobs["worker"])
