"""Scrapy's own FilesPipeline tests, run against fetcher's pipeline.

Scrapy 2.19.0's ``tests/test_pipeline_files.py`` and ``tests/test_pipeline_crawl.py``
(fetched from its sdist by ``python -m tests.scrapy_suite.get``, never copied into
this repository) run in a subprocess, in their own rootdir (their ``tests`` package
is not ours), with the plugin tests/scrapy_suite/fetcher_swap.py putting fetcher's
pipeline and download handler in stock's place. Every test that fails must be on
tests/scrapy_suite/excused.txt, with the deliberate difference that makes it fail,
and every test on that list must still fail: a stale excuse fails too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.scrapy_suite import get

SUITE = Path(__file__).resolve().parent / "scrapy_suite"
EXCUSED = SUITE / "excused.txt"
TIMEOUT = 120  # seconds for the whole run (it takes 10-20); a test stuck for 30 s has its stack dumped


def excused() -> dict[str, str]:
    """``ID  # reason`` lines: test ID -> reason."""
    found: dict[str, str] = {}
    for n, line in enumerate(EXCUSED.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"\s*(\S+)\s+#\s*(\S.*)", line)
        assert match, f"{EXCUSED.name}:{n}: not `ID  # reason`: {line!r}"
        test_id, reason = match.groups()
        assert test_id not in found, f"{EXCUSED.name}:{n}: {test_id} is listed twice"
        found[test_id] = reason
    return found


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """Each test's ID (as pytest names it) -> ("passed" | "failed" | "skipped", why it
    failed), from a junit XML written with junit_family=xunit1 (which keeps each test's file)."""
    result: dict[str, tuple[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        path, classname, name = case.get("file", ""), case.get("classname", ""), case.get("name", "")
        module = path.removesuffix(".py").replace("/", ".")
        cls = classname.removeprefix(module).lstrip(".")
        test_id = "::".join(p for p in (path, cls, name) if p)
        problems = [c for c in case if c.tag in ("failure", "error")]
        if problems:
            outcome = "failed", " | ".join(c.get("message", c.tag).splitlines()[0][:300] for c in problems)
        else:
            outcome = ("skipped" if case.find("skipped") is not None else "passed"), ""
        if result.get(test_id, ("",))[0] != "failed":  # a teardown error is reported apart from its call
            result[test_id] = outcome
    return result


def run_suite(tmp_path: Path) -> tuple[int, str, dict[str, tuple[str, str]]]:
    junit, log = tmp_path / "junit.xml", tmp_path / "output.txt"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "AWS_", "GOOGLE_")) and k not in ("PYTHONPATH", "SCRAPY_SETTINGS_MODULE")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(SUITE), str(get.SITE)]),  # fetcher_swap and pytest-twisted
        # fetcher checks a remote store at start: never with real credentials or a cloud metadata service
        AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull,
    )
    cmd = [sys.executable, "-m", "pytest", *get.MODULES, "-p", "fetcher_swap", "-p", "no:cacheprovider",
           "--rootdir", str(get.TREE), "-c", str(get.TREE / "pyproject.toml"),
           f"--junitxml={junit}", "-o", "junit_family=xunit1", "-o", "faulthandler_timeout=30", "-q", "-rfE",
           "--color=no"]
    with log.open("w") as out:
        # Its own session: on a timeout the mock servers it started go with it.
        proc = subprocess.Popen(cmd, cwd=get.TREE, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of this run is left
            except ProcessLookupError:
                pass
            proc.wait()
    output = log.read_text(errors="replace")
    if code is None:
        pytest.fail(f"Scrapy's tests did not finish in {TIMEOUT} s:\n{output[-20000:]}")
    if not junit.exists():
        pytest.fail(f"Scrapy's tests did not run (exit {code}):\n{output[-20000:]}")
    return code, output, outcomes(junit)


def test_scrapy_files_pipeline_suite_passes_with_fetchers_pipeline(tmp_path: Path) -> None:
    if not get.is_ready():
        pytest.fail(f"Scrapy {get.VERSION}'s test suite is not in {get.TREE}: run `{get.COMMAND}` from the "
                    "repository root (it downloads Scrapy's sdist and pytest-twisted from PyPI) before pytest")
    installed = version("scrapy")
    assert installed == get.VERSION, (
        f"the suite is Scrapy {get.VERSION}'s but Scrapy {installed} is installed: set VERSION and SHA256 "
        "in tests/scrapy_suite/get.py to the installed release's sdist and review excused.txt")
    excuses = excused()
    code, output, results = run_suite(tmp_path)
    assert results, f"no test ran (exit {code}):\n{output[-20000:]}"
    failed = {test_id: why for test_id, (outcome, why) in results.items() if outcome == "failed"}
    unexcused = sorted(failed.keys() - excuses.keys())
    stale = sorted(excuses.keys() - failed.keys())
    assert not unexcused and not stale, "\n".join([
        *([f"Failing and not excused (fix fetcher, or add `ID  # the deliberate difference` to {EXCUSED}):",
           *(f"  {test_id}\n      {failed[test_id]}" for test_id in unexcused)] if unexcused else []),
        *([f"Excused but no longer failing (remove them from {EXCUSED}):",
           *(f"  {test_id} ({results.get(test_id, ('not run',))[0]})" for test_id in stale)] if stale else []),
        f"The run's output is in {tmp_path / 'output.txt'}; its end:", output[-8000:],
    ])
