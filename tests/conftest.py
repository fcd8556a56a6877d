"""Shared fixtures: one test origin per session, and real ``scrapy crawl fetch`` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from scrapy.utils.reactor import install_reactor

from tests.origin import Origin


def pytest_configure(config: pytest.Config) -> None:
    """The unit tests that build fetcher's components in this process (test_pipeline,
    test_handler) need the reactor fetcher runs with; installed once, before any import
    of twisted.internet.reactor picks Twisted's default."""
    if "twisted.internet.reactor" not in sys.modules:
        install_reactor("twisted.internet.asyncioreactor.AsyncioSelectorReactor")

ROOT = Path(__file__).resolve().parent.parent
SCRAPY = str(Path(sys.executable).with_name("scrapy"))
# Short limits so that fault tests take seconds; the shipped defaults stay realistic.
FAST = {
    "FETCHER_BACKOFF_BASE": "0.1",
    "FETCHER_BACKOFF_MAX": "0.5",
    "DOWNLOAD_TIMEOUT": "10",
    "FETCHER_STALL_TIMEOUT": "5",
}


@dataclass
class Run:
    """What a person sees after a run: exit status, output, files, manifest."""

    returncode: int
    stdout: str
    stderr: str
    cwd: Path

    @property
    def store(self) -> Path:
        return self.cwd / "downloads"

    @property
    def manifest(self) -> list[dict[str, Any]]:
        path = self.store / "manifest.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def record(self, url: str) -> dict[str, Any]:
        matches = [r for r in self.manifest if r["url"] == url]
        assert len(matches) == 1, (url, self.manifest)
        return matches[0]

    @property
    def log(self) -> str:
        return self.stderr


# Runs a command as the only child of a fresh process and prints the child's peak RSS (KiB on
# Linux) and its exit status. A child's high-water mark starts at its parent's (fork, then exec),
# and the test process grows over a session: measured from it, a small crawl looks big.
_MEASURE = """
import resource, subprocess, sys
stdin = open(sys.argv[1], "rb") if sys.argv[1] else subprocess.DEVNULL
with open(sys.argv[2], "wb") as log:
    code = subprocess.call(sys.argv[3:], stdin=stdin, stdout=subprocess.DEVNULL, stderr=log)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)
"""


class Fetch:
    """Runs ``scrapy crawl fetch`` in its own working directory, as a user would."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd

    def command(self, *args: str, settings: dict[str, Any] | None = None) -> list[str]:
        cmd = [SCRAPY, "crawl", "fetch", *args]
        for key, value in {**FAST, **(settings or {})}.items():
            cmd += ["-s", f"{key}={value}"]
        return cmd

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SCRAPY_SETTINGS_MODULE"] = "fetcher.settings"
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("SCRAPY_PROJECT", None)
        return env

    def __call__(
        self,
        list_text: str | None = None,
        *args: str,
        settings: dict[str, Any] | None = None,
        timeout: float = 120,
        stdin: str | None = None,
    ) -> Run:
        if list_text is not None:
            (self.cwd / "urls.txt").write_text(list_text)
            args = ("-a", "list=urls.txt", *args)
        proc = subprocess.run(
            self.command(*args, settings=settings),
            cwd=self.cwd,
            env=self.env(),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Run(proc.returncode, proc.stdout, proc.stderr, self.cwd)


def measured(fetch: Fetch, *args: str, settings: dict[str, Any] | None = None, stdin: Path | None = None,
             timeout: float = 180) -> tuple[Run, float]:
    """``scrapy crawl fetch`` with *args* as :class:`Fetch` runs it, and its peak RSS in MiB."""
    log = fetch.cwd / "crawl.log"
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(stdin or ""), str(log), *fetch.command(*args, settings=settings)],
        check=False, cwd=fetch.cwd, env=fetch.env(), capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_kib, code = (int(x) for x in proc.stdout.split()[-2:])
    return Run(code, "", log.read_bytes().decode("utf-8", "backslashreplace"), fetch.cwd), peak_kib / 1024


@pytest.fixture(scope="session")
def origin() -> Iterator[Origin]:
    with Origin().start() as o:
        yield o


@pytest.fixture
def fetch(tmp_path: Path, origin: Origin) -> Fetch:
    origin.reset_stats()
    return Fetch(tmp_path)
