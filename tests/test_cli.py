"""The `fetcher` console command: the fetch spider from any directory, as installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.origin import Origin, content_bytes

FETCHER = str(Path(sys.executable).with_name("fetcher"))


def installed_env() -> dict[str, str]:
    """The environment of a user who pip-installed fetcher: no project settings, no source path."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SCRAPY_") and k != "PYTHONPATH"}


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FETCHER, *args, "-s", "FETCHER_BACKOFF_BASE=0.05", "-s", "RETRY_TIMES=1"],
                          cwd=cwd, env=installed_env(), capture_output=True, text=True, timeout=120)


def test_fetcher_runs_a_list_from_any_folder_and_says_how_to_rerun(origin: Origin, tmp_path: Path) -> None:
    assert not (tmp_path / "scrapy.cfg").exists()  # no project here: the command brings its settings
    (tmp_path / "urls.txt").write_text(f"{origin.url}/gen/4k/cli.bin\n{origin.url}/status/404\n")
    first = run(tmp_path, "urls.txt")
    assert first.returncode == 1, first.stderr
    assert (tmp_path / f"downloads/127.0.0.1:{origin.port}/gen/4k/cli.bin").read_bytes() == content_bytes(
        "cli.bin", 4096)
    failed = (tmp_path / "downloads/failed.txt").read_text()
    assert "# Retry them with: fetcher downloads/failed.txt\n" in failed
    assert "fetcher downloads/failed.txt" in first.stderr and "-a list=" not in first.stderr

    (tmp_path / "other").mkdir()
    second = run(tmp_path, "urls.txt", "-s", f"FILES_STORE={tmp_path / 'other'}")
    assert f"Retry them with: fetcher {tmp_path / 'other/failed.txt'} -s FILES_STORE={tmp_path / 'other'}" \
        in second.stderr

    rerun = run(tmp_path, "downloads/failed.txt")
    assert rerun.returncode == 1
    records = [json.loads(line) for line in (tmp_path / "downloads/manifest.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in records) == ["downloaded", "failed"]


def test_a_list_on_standard_input(origin: Origin, tmp_path: Path) -> None:
    proc = subprocess.run([FETCHER, "-"], input=f"{origin.url}/gen/2k/stdin-cli.bin\n", cwd=tmp_path,
                          env=installed_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / f"downloads/127.0.0.1:{origin.port}/gen/2k/stdin-cli.bin").read_bytes() == content_bytes(
        "stdin-cli.bin", 2048)


def test_usage(tmp_path: Path) -> None:
    proc = subprocess.run([FETCHER], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage: fetcher LIST" in proc.stderr
    proc = subprocess.run([FETCHER, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "scrapy crawl fetch -a list=LIST" in proc.stdout
