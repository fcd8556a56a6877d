"""Fetch the part of Scrapy's own test suite that tests/test_scrapy_suite.py runs.

    python -m tests.scrapy_suite.get

Downloads the pinned Scrapy sdist from PyPI (``pip download``) into ``.scrapy-suite/``
at the repository root (git-ignored), checks it against the sha256 below, and unpacks
only what ``tests/test_pipeline_files.py`` and ``tests/test_pipeline_crawl.py`` need
(their ``tests`` package: mock servers, keys, helpers, sample site; Scrapy's
conftest.py and its pytest configuration in pyproject.toml). Nothing of Scrapy's
source is unpacked: the tests run against the installed Scrapy.

It also puts pytest-twisted, which runs those tests in a Twisted reactor, into
``.scrapy-suite/site/`` (``pip install --target``, pinned by hash) rather than into the
venv: installed there, it would load into fetcher's own pytest runs too, and stop them
at start (it installs its default reactor where tests/conftest.py installed asyncio's).
Its dependencies, greenlet and decorator, are in the ``test`` extra.

A second run with everything in place does nothing. Exits non-zero, saying why, when
a download or a check fails.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

VERSION = "2.19.0"
# The sdist's sha256, as PyPI lists it for scrapy-2.19.0.tar.gz (and as a download gives).
SHA256 = "34130726582b64c91531162ab277c4053e558876d49ba219cb43679e71d80a87"

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".scrapy-suite"
SDIST = CACHE / f"scrapy-{VERSION}.tar.gz"
TREE = CACHE / f"scrapy-{VERSION}"  # the rootdir the tests run in
MARKER = TREE / ".unpacked"  # holds SHA256 once the tree is complete
COMMAND = "python -m tests.scrapy_suite.get"
# pytest-twisted, for the subprocess only (on its PYTHONPATH): the wheel PyPI lists, and its sha256.
SITE = CACHE / "site"
TWISTED_PLUGIN = "pytest-twisted==1.14.3"
TWISTED_PLUGIN_SHA256 = "f2e3f3f6f12f78df17c028fe16d87af09c76b95a7a85bc378b2d3e73a086e81a"
TWISTED_PLUGIN_MARKER = SITE / "pytest_twisted-1.14.3.dist-info"

MODULES = ("tests/test_pipeline_files.py", "tests/test_pipeline_crawl.py")
# Paths in the sdist (below scrapy-VERSION/) that the two modules and conftest.py import or read.
FILES = (
    "conftest.py",
    "pyproject.toml",  # [tool.pytest.ini_options]: --reactor=asyncio, filterwarnings, markers
    "tests/__init__.py",
    "tests/ignores.txt",  # read by conftest.py
    "tests/spiders.py",
    "tests/utils/__init__.py",
    "tests/utils/cloud.py",
    "tests/utils/decorators.py",
    "tests/utils/media_pipelines.py",
    *MODULES,
)
FOLDERS = (
    "tests/keys/",  # TLS keys of the mock server (conftest.py generates the rest)
    "tests/mockserver/",
    "tests/sample_data/books/",  # read when the mock HTTP server starts
    "tests/sample_data/test_site/",  # served as /static/
)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_ready() -> bool:
    """Whether the checked sdist, its complete tree and pytest-twisted are in place."""
    return (SDIST.is_file() and MARKER.is_file() and MARKER.read_text().strip() == SHA256
            and TWISTED_PLUGIN_MARKER.is_dir())


def pip(*args: str, requirement: str) -> None:
    """``python -m pip <args>`` for one hash-pinned requirement (pip itself refuses another
    file); exits, with pip's output, on failure."""
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp, "requirement.txt")
        req.write_text(requirement + "\n")
        cmd = [sys.executable, "-m", "pip", *args, "--quiet", "--no-deps", "--require-hashes", "-r", str(req)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"{COMMAND}: `{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")


def download() -> None:
    CACHE.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        pip("download", "--no-binary", "scrapy", "-d", tmp, requirement=f"scrapy=={VERSION} --hash=sha256:{SHA256}")
        got = Path(tmp, SDIST.name)
        if not got.is_file() or sha256(got) != SHA256:
            sys.exit(f"{COMMAND}: pip gave no {SDIST.name} with the pinned sha256 {SHA256}")
        got.replace(SDIST)


def unpack() -> None:
    shutil.rmtree(TREE, ignore_errors=True)
    prefix = PurePosixPath(f"scrapy-{VERSION}")
    wanted = []
    with tarfile.open(SDIST) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            name = PurePosixPath(member.name)
            if name.parts[0] != prefix.name:
                continue
            rel = name.relative_to(prefix).as_posix()
            if rel in FILES or rel.startswith(FOLDERS):
                wanted.append(member)
        found = {PurePosixPath(m.name).relative_to(prefix).as_posix() for m in wanted}
        if missing := [p for p in FILES if p not in found] + [d for d in FOLDERS if not any(
                f.startswith(d) for f in found)]:
            sys.exit(f"{COMMAND}: {SDIST.name} lacks {', '.join(missing)}")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python 3.11.4+
        tar.extractall(CACHE, members=wanted, **safe)
    MARKER.write_text(SHA256 + "\n")


def main() -> None:
    if is_ready():
        return
    if not (MARKER.is_file() and MARKER.read_text().strip() == SHA256 and SDIST.is_file()):
        if not (SDIST.is_file() and sha256(SDIST) == SHA256):
            SDIST.unlink(missing_ok=True)
            print(f"Downloading the scrapy=={VERSION} sdist into {CACHE}", file=sys.stderr)
            download()
        unpack()
        print(f"Scrapy {VERSION}'s {' and '.join(MODULES)} are in {TREE}", file=sys.stderr)
    if not TWISTED_PLUGIN_MARKER.is_dir():
        shutil.rmtree(SITE, ignore_errors=True)
        pip("install", "--only-binary", ":all:", "--target", str(SITE),
            requirement=f"{TWISTED_PLUGIN} --hash=sha256:{TWISTED_PLUGIN_SHA256}")
        print(f"{TWISTED_PLUGIN} is in {SITE} (for Scrapy's tests only)", file=sys.stderr)


if __name__ == "__main__":
    main()
