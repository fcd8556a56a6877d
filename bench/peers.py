"""Benchmark (issue 9): fetcher against its peers, on six workloads.

Run by hand, as root (it mounts tmpfs, and may apt-get install nginx-light, aria2,
wget2 and time, and pip install matplotlib into this venv):

    .venv/bin/python -m bench.peers                        # everything, about 14 minutes
    .venv/bin/python -m bench.peers --rounds 3             # 3 rounds of every workload
    .venv/bin/python -m bench.peers --only A,E --tools fetcher,curl
    .venv/bin/python -m bench.peers --nice -20             # on a machine that other work keeps busy

Tools, all at concurrency 64:
  fetcher  scrapy crawl fetch -a list=... -s CONCURRENT_REQUESTS=64 -s CONCURRENT_REQUESTS_PER_DOMAIN=64
           -s FETCHER_PROGRESS=off -s FILES_STORE=<tmpfs>   (SCRAPY_SETTINGS_MODULE=fetcher.settings)
  fetcher-wN  fetcher with -s FETCHER_WORKERS=N (fetcher-w1, -w2, -w4; "fetcher" is the default, auto)
  stock    scrapy runspider bench/stock_spider.py: stock FilesPipeline, Scrapy's defaults but the same
           concurrency, LOG_LEVEL=INFO, no telnet or remote-control server, run outside the project
  scrapy-floor  scrapy runspider bench/floor_spider.py, run as stock: Scrapy's request path
           (engine.download) and one write a file, nothing else; the floor under any Scrapy-based
           downloader (not run by default; not for C: it holds each body in memory)
  scrapy-floor-aio  the same in Scrapy's asyncio-only mode (TWISTED_REACTOR_ENABLED=False) with its
           experimental aiohttp handler, the mode issue 18 asked to try
  aria2c   aria2c -i LIST -j 64 -x 1 -s 1 --file-allocation=none   (F: -s 8 -x 8 -k 20M, segmented)
  curl     curl --parallel --parallel-max 64 --fail -K CONFIG      (url = / output = pairs)
  wget2    wget2 --no-config --max-threads=64 -i LIST

Workloads (files are random bytes; nginx serves them from a tmpfs mounted for the run):
  A  5,000 x 16 KiB                 nginx
  B  200 x 4 MiB                    nginx
  C  1 x 3 GiB                      nginx (stock fails by design: Scrapy's 1 GiB DOWNLOAD_MAXSIZE)
  D  2,000 x 64 KiB, 50 ms delay    the Python test origin (tests.origin.Origin, ?delay=0.05), own process
  E  empty list                     start-up and shut-down only
  G  10 x 16 KiB                    nginx: a short list, start-up and a few files
  F  1 x 512 MiB at 20 MiB/s per connection   nginx `limit_rate 20m`; fetcher with FETCHER_SPLIT=8
     (8 ranges at once, 20 MiB minimum each, as aria2c -s 8 -x 8 -k 20M), fetcher-1 (one connection,
     the baseline), stock and aria2c run F by default (curl and wget2 on one connection take 25.6 s
     by construction; --tools naming them runs them)

Each workload runs its rounds one after the other, and each round runs every tool
once, interleaved, so that a noisy neighbour hurts them all alike. Downloads go to
a second tmpfs, emptied before each run. Per run:

  wall       fork to exit of the tool's process
  last file  newest st_ctime among the downloaded files, from the fork: the download
             time without the tool's shut-down (ctime, not mtime: fetcher and wget2 give
             files the server's Last-Modified as mtime)
  RSS        peak resident set of the tool's process (ru_maxrss, through GNU time: see run_once)
  CPU        its user + sys seconds (os.wait4 of GNU time, which adds a millisecond)
  ok         exit status 0, the number of files and their total bytes, and for C and F
             the sha256 against the source's

The report gives medians and the ratios fetcher / peer by wall time; it is printed,
and written to bench/out/peers.md, bench/out/peers.json (every run) and
bench/out/peers.png (matplotlib).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.machine import (
    ROOT,
    SCRAPY,
    TICKS,
    background_load,
    compile_sources,
    cpu_seconds,
    isolate,
    machine_ticks,
    mount_tmpfs,
    process_tree,
    spawn,
    start_nginx,
    stop,
    unmount,
)

OUT = ROOT / "bench" / "out"
TOOLS = ("fetcher", "stock", "aria2c", "curl", "wget2", "fetcher-1", "fetcher-w1", "fetcher-w2", "fetcher-w4",
         "scrapy-floor", "scrapy-floor-aio")
PEERS = TOOLS[:5]  # what runs by default; fetcher-1 (one connection per file) is F's baseline
STATE_NAMES = {"manifest.jsonl", "failed.txt"}  # fetcher's records in FILES_STORE: not downloads
KIB, MIB, GIB = 1024, 1024**2, 1024**3
SLOW_LOCATION = "\n        location /slow/ { limit_rate 20m; }"  # F: a per-connection cap, as a CDN's
EMPTY_LIST_EXIT = {"curl": 2}  # curl answers an empty config with "no URL specified!": its way of being done
RUN_TIMEOUT = 600.0  # seconds; a run still going then is killed and counted as failed


# The test origin in a process of its own (not a thread of this one), until its stdin closes.
ORIGIN_SCRIPT = """\
import sys
from tests.origin import Origin
origin = Origin().start()
origin.record_requests = False
print(origin.url, flush=True)
sys.stdin.read()
origin.stop()
"""


@dataclass
class Workload:
    key: str
    title: str
    files: int
    size: int
    server: str  # "nginx" or "origin"
    rounds: int
    tools: tuple[str, ...] = PEERS  # run by default (--tools runs the ones it names on every workload)

    @property
    def total(self) -> int:
        return self.files * self.size

    def names(self) -> list[str]:
        return ["big.bin"] if self.files == 1 else [f"f{i}.bin" for i in range(self.files)]


WORKLOADS = {
    "A": Workload("A", "5,000 x 16 KiB", 5000, 16 * KIB, "nginx", 5),
    "B": Workload("B", "200 x 4 MiB", 200, 4 * MIB, "nginx", 3),
    "C": Workload("C", "1 x 3 GiB", 1, 3 * GIB, "nginx", 3),
    "D": Workload("D", "2,000 x 64 KiB, 50 ms server delay", 2000, 64 * KIB, "origin", 5),
    "E": Workload("E", "empty list", 0, 0, "nginx", 5),
    "G": Workload("G", "10 x 16 KiB", 10, 16 * KIB, "nginx", 5),  # a short list: start-up and a few files
    # curl and wget2 (as run here) fetch on one connection: 512 MiB / 20 MiB/s = 25.6 s by construction,
    # 2.6 minutes of a default run that say nothing new. --tools fetcher,stock,aria2c,curl,wget2 runs them.
    "F": Workload("F", "1 x 512 MiB at 20 MiB/s per connection", 1, 512 * MIB, "nginx", 3,
                  ("fetcher", "fetcher-1", "stock", "aria2c")),
}


@dataclass
class Run:
    workload: str
    tool: str
    round: int
    wall: float
    last: float | None  # seconds from the fork to the newest file's ctime
    rss: float  # MiB
    cpu: float  # user + sys seconds
    exit: int
    files: int
    bytes: int
    ok: bool
    why: str = ""


@dataclass
class Setup:
    work: Path
    dl: Path
    lists: dict[str, Path] = field(default_factory=dict)  # workload -> aria2c-format list
    curl: dict[str, Path] = field(default_factory=dict)  # workload -> curl config
    digests: dict[str, str] = field(default_factory=dict)  # workload -> sha256 of its single file


# --------------------------------------------------------------------------- peers


def apt_install(packages: list[str]) -> None:
    print(f"missing: apt-get install -y {' '.join(packages)}", flush=True)
    # RUNLEVEL=1: a package's own service (nginx on port 80) is not started.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    cmd = ["apt-get", "install", "-y", "-q", *packages]
    if subprocess.run(cmd, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            raise SystemExit(f"could not install {packages} with apt-get")


def find_binaries(tools: list[str]) -> dict[str, str]:
    """nginx and the peers' binaries, installing the missing ones (Debian packages)."""
    wanted = {"nginx": "nginx-light", "time": "time", **{t: p for t, p in (("aria2c", "aria2"), ("curl", "curl"),
                                                          ("wget2", "wget2")) if t in tools}}

    def which(name: str) -> str | None:
        return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}")
                                           if os.path.exists(p)), None)

    missing = [package for name, package in wanted.items() if not which(name)]
    if missing:
        apt_install(missing)
    found = {name: which(name) for name in wanted}
    if not all(found.values()):
        raise SystemExit(f"not found after install: {[n for n, p in found.items() if not p]}")
    return found  # type: ignore[return-value]


def versions(binaries: dict[str, str]) -> dict[str, str]:
    out = {}
    for name, path in binaries.items():
        proc = subprocess.run([path, "-v" if name == "nginx" else "--version"], capture_output=True, text=True, check=False)
        text = (proc.stdout or proc.stderr).strip().splitlines()
        out[name] = " ".join(text[0].split()[:3]) if text else "?"
    import scrapy  # only for its version

    out["scrapy"] = f"Scrapy {scrapy.__version__}"
    return out


def pyplot():  # type: ignore[no-untyped-def]
    """matplotlib's pyplot, pip-installed into this venv if missing (a `bench` extra some day)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is missing: pip install matplotlib", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- servers and files


def start_origin(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", ORIGIN_SCRIPT], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        stop(proc)
        raise SystemExit("the test origin did not start")
    return proc, url


def write_big(path: Path, size: int) -> str:
    """A random 8 MiB + 9 block (an odd period, so no power-of-two offset lines up with it),
    repeated: fast to write, and a misplaced segment still changes the sha256."""
    block = os.urandom(8 * MIB + 9)
    doubled = memoryview(block + block)
    period = len(block)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        pos = 0
        while pos < size:
            n = min(period, size - pos)
            chunk = doubled[pos % period: pos % period + n]
            f.write(chunk)
            digest.update(chunk)
            pos += n
    return digest.hexdigest()


def warm(folder: Path, size: int) -> None:
    """Write and delete *size* bytes in *folder*: this VM backs memory on first touch, and the
    first tool to write there would pay for it (C in round 1: 11.5 s instead of 5 s)."""
    path = folder / ".warm"
    zeros = bytes(MIB)
    with open(path, "wb") as f:
        f.writelines(zeros for _ in range(0, size, MIB))
    path.unlink()


def write_files(w: Workload, www: Path, base: str, setup: Setup) -> None:
    """The workload's files under www/<key>/ (F: www/slow/), its list and its curl config."""
    if w.server == "nginx" and w.files:
        folder = www / ("slow" if w.key == "F" else w.key)
        folder.mkdir()
        for name in w.names():
            if w.files == 1:
                setup.digests[w.key] = write_big(folder / name, w.size)
            else:
                (folder / name).write_bytes(os.urandom(w.size))
        urls = [f"{base}/{folder.name}/{name}" for name in w.names()]
    elif w.server == "origin":
        urls = [f"{base}/gen/{w.size // KIB}k/{name}?delay=0.05" for name in w.names()]
    else:
        urls = []
    listing = setup.work / f"{w.key}.txt"
    listing.write_text("".join(f"{url}\n" for url in urls))
    config = setup.work / f"{w.key}.curl"
    config.write_text("".join(f'url = "{url}"\noutput = "{name}"\n' for url, name in zip(urls, w.names())))
    setup.lists[w.key], setup.curl[w.key] = listing, config


# --------------------------------------------------------------------------- one run


def command(tool: str, w: Workload, setup: Setup, binaries: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    lst, dl = str(setup.lists[w.key]), str(setup.dl)
    base_env = {k: v for k, v in os.environ.items() if k not in ("SCRAPY_SETTINGS_MODULE", "SCRAPY_PROJECT")}
    concurrency = ["-s", "CONCURRENT_REQUESTS=64", "-s", "CONCURRENT_REQUESTS_PER_DOMAIN=64"]
    if tool.startswith("fetcher"):
        env = {**base_env, "SCRAPY_SETTINGS_MODULE": "fetcher.settings",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        # F: 8 ranges at once, as aria2c's -s 8 -x 8 -k 20M (fetcher-1: one connection, the baseline).
        split = ["-s", "FETCHER_SPLIT=8"] if w.key == "F" and tool == "fetcher" else []
        # fetcher-wN: FETCHER_WORKERS=N (fetcher itself: the default, auto).
        workers = ["-s", f"FETCHER_WORKERS={tool.removeprefix('fetcher-w')}"] if tool.startswith("fetcher-w") else []
        return [SCRAPY, "crawl", "fetch", "-a", f"list={lst}", *concurrency, "-s", "FETCHER_PROGRESS=off",
                "-s", f"FILES_STORE={dl}", *split, *workers], env
    # Run from the work folder: no scrapy.cfg, no project settings.
    bare = [*concurrency, "-s", "LOG_LEVEL=INFO", "-s", "TELNETCONSOLE_ENABLED=False",
            "-s", "REMOTE_CONTROL_ENABLED=False"]
    if tool == "stock":
        return [SCRAPY, "runspider", str(ROOT / "bench" / "stock_spider.py"), "-a", f"list={lst}", *bare,
                "-s", f"FILES_STORE={dl}"], base_env
    if tool.startswith("scrapy-floor"):
        handler = '{"http": "scrapy.core.downloader.handlers._aiohttp.AiohttpDownloadHandler"}'
        aio = ["-s", "TWISTED_REACTOR_ENABLED=False", "-s", f"DOWNLOAD_HANDLERS={handler}"] if tool.endswith("aio") else []
        return [SCRAPY, "runspider", str(ROOT / "bench" / "floor_spider.py"), "-a", f"list={lst}", "-a", f"out={dl}",
                *bare, *aio], base_env
    if tool == "aria2c":
        # -x is --max-connection-per-server, per download: -j 64 -x 1 is 64 transfers on 64 connections.
        split = ["-s", "8", "-x", "8", "-k", "20M"] if w.key == "F" else ["-s", "1", "-x", "1"]
        return [binaries["aria2c"], "-i", lst, "-d", dl, "-j", "64", *split, "--file-allocation=none",
                "--console-log-level=error", "--summary-interval=0", "--download-result=hide",
                "--show-console-readout=false"], base_env
    if tool == "curl":
        return [binaries["curl"], "--parallel", "--parallel-max", "64", "--fail", "--silent", "--show-error",
                "--output-dir", dl, "-K", str(setup.curl[w.key])], base_env
    if tool == "wget2":
        return [binaries["wget2"], "--no-config", "--quiet", "--max-threads=64", "-i", lst, "-P", dl], base_env
    raise ValueError(tool)


def downloads(dl: Path) -> list[Path]:
    """Every file a tool left in dl, without fetcher's state (.fetcher/, manifest, failed list)."""
    found = []
    for folder, dirs, files in os.walk(dl):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder, f) for f in files if f not in STATE_NAMES]
    return found


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def clean(dl: Path) -> None:
    for child in dl.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def run_once(tool: str, w: Workload, r: int, setup: Setup, binaries: dict[str, str]) -> Run:
    clean(setup.dl)
    cmd, env = command(tool, w, setup, binaries)
    log = setup.work / f"{w.key}-{tool}.log"
    epoch = time.time()
    started = time.perf_counter()
    rusage = setup.work / "rusage"
    rusage.unlink(missing_ok=True)
    # GNU time forks the tool and reports its ru_maxrss: our own fork's would count this
    # Python process's pages, which Linux keeps in the peak across exec (~50 MiB).
    pid = spawn([binaries["time"], "-f", "%M", "-o", str(rusage), *cmd], setup.work, env, log)
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        os.kill(pid, signal.SIGKILL)

    timer = threading.Timer(RUN_TIMEOUT, kill)
    timer.start()
    try:
        _, status, usage = os.wait4(pid, 0)
    except BaseException:  # interrupted: stop our tool before going
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        timer.cancel()
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    try:
        rss = int(rusage.read_text().split()[-1]) / 1024
    except (OSError, ValueError, IndexError):  # killed: GNU time wrote nothing
        rss = float("nan")
    files = downloads(setup.dl)
    stats = [f.stat() for f in files]
    total = sum(s.st_size for s in stats)
    last = max(s.st_ctime for s in stats) - epoch if stats else None
    why = []
    if killed.is_set():
        why.append(f"killed after {RUN_TIMEOUT:.0f} s")
    elif code != 0 and not (w.files == 0 and EMPTY_LIST_EXIT.get(tool) == code):
        why.append(f"exit {code}")
    if len(files) != w.files or total != w.total:
        why.append(f"{len(files)} files, {total} bytes")
    elif w.key in setup.digests and sha256(files[0]) != setup.digests[w.key]:
        why.append("sha256 differs")
    if why:  # the tool's last complaint, else its last lines
        lines = log.read_text(errors="replace").strip().splitlines()
        said = [line for line in lines if re.search(r"(WARNING|ERROR)[:\]]|error:", line)][-2:] or lines[-2:]
        why.append(" | ".join(line.strip()[:200] for line in said))
    return Run(w.key, tool, r + 1, wall, last, rss, usage.ru_utime + usage.ru_stime,
               code, len(files), total, not why, "; ".join(why))


# --------------------------------------------------------------------------- report


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[Run], keys: list[str], tools: list[str]) -> dict[tuple[str, str], dict[str, float | int]]:
    """Medians per (workload, tool) over its successful runs (over all of them when none succeeded)."""
    out: dict[tuple[str, str], dict[str, float | int]] = {}
    for key in keys:
        for tool in tools:
            mine = [r for r in runs if r.workload == key and r.tool == tool]
            if not mine:
                continue
            good = [r for r in mine if r.ok] or mine
            out[key, tool] = {
                "wall": median([r.wall for r in good]),
                "last": median([r.last for r in good if r.last is not None]),
                "rss": median([r.rss for r in good]),
                "cpu": median([r.cpu for r in good]),
                "ok": sum(r.ok for r in mine),
                "runs": len(mine),
            }
    return out


def fmt(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def report(runs: list[Run], keys: list[str], tools: list[str], header: list[str]) -> str:
    stats = summarize(runs, keys, tools)
    lines = [*header, "", "Median wall seconds (fetcher / peer in brackets; failed runs: ✗ ok/runs):", ""]
    lines.append("| workload | " + " | ".join(tools) + " |")
    lines.append("|---|" + "---|" * len(tools))
    for key in keys:
        cells = []
        base = stats.get((key, "fetcher"))
        for tool in tools:
            s = stats.get((key, tool))
            if s is None:
                cells.append("")
                continue
            cell = fmt(float(s["wall"]))
            if s["ok"] < s["runs"]:
                cell += f" ✗ {s['ok']}/{s['runs']}"
            if tool != "fetcher" and base and s["ok"] and base["ok"]:
                cell += f" ({float(base['wall']) / float(s['wall']):.2f}x)"
            cells.append(cell)
        lines.append(f"| {key}: {WORKLOADS[key].title} | " + " | ".join(cells) + " |")
    lines += ["", "Medians per tool (runs that passed the check):", "",
              "| workload | tool | wall s | last file s | files/s | MB/s | peak RSS MiB | CPU s | ok | fetcher/tool (wall) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        w = WORKLOADS[key]
        base = stats.get((key, "fetcher"))
        for tool in tools:
            s = stats.get((key, tool))
            if s is None:
                continue
            last = float(s["last"])
            rate = w.files / last if w.files and last > 0 else float("nan")  # NaN > 0 is False
            mbps = w.total / 1e6 / last if w.total and last > 0 else float("nan")
            ratio = (f"{float(base['wall']) / float(s['wall']):.2f}"
                     if tool != "fetcher" and base and s["ok"] and base["ok"] else "")
            lines.append(f"| {key} | {tool} | {fmt(float(s['wall']))} | {fmt(last)} | {fmt(rate, 0)} | {fmt(mbps, 0)} | "
                         f"{fmt(float(s['rss']), 0)} | {fmt(float(s['cpu']))} | {s['ok']}/{s['runs']} | {ratio} |")
    failures = [r for r in runs if not r.ok]
    if failures:
        lines += ["", "Failed checks (the first failure of each):", ""]
        for key in keys:
            for tool in tools:
                mine = [r for r in runs if r.workload == key and r.tool == tool]
                bad = [r for r in mine if not r.ok]
                if bad:
                    lines.append(f"- {key} {tool}, {len(bad)} of {len(mine)} runs: {bad[0].why}")
    return "\n".join(lines) + "\n"


def chart(runs: list[Run], keys: list[str], tools: list[str], path: Path) -> None:
    plt = pyplot()
    stats = summarize(runs, keys, tools)
    colors = {"fetcher": "#d62728", "stock": "#ff7f0e", "aria2c": "#1f77b4", "curl": "#2ca02c", "wget2": "#9467bd"}
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        present = [t for t in tools if (key, t) in stats]
        walls = [float(stats[key, t]["wall"]) for t in present]
        bars = ax.bar(present, walls, color=[colors.get(t, "grey") for t in present])
        base = stats.get((key, "fetcher"))
        for bar, tool in zip(bars, present):
            s = stats[key, tool]
            if not s["ok"]:
                bar.set_hatch("//")
                bar.set_alpha(0.4)
                label = "fails"
            elif tool != "fetcher" and base and base["ok"]:
                label = f"{float(s['wall']):.2f}s\n{float(base['wall']) / float(s['wall']):.1f}x"
            else:
                label = f"{float(s['wall']):.2f}s"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8)
        ax.set_title(f"{key}: {WORKLOADS[key].title}", fontsize=9)
        ax.set_ylabel("median wall s")
        ax.set_ylim(0, max(walls, default=1) * 1.3 or 1)
        ax.tick_params(axis="x", labelsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle("fetcher and its peers, concurrency 64, loopback, tmpfs (label: s, and fetcher / peer)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def mem_available_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=0,
                        help="rounds of every workload (default: 5 for A, D, E and 3 for B, C, F)")
    parser.add_argument("--only", default="A,B,C,D,E,F", help="workloads to run, e.g. A,E")
    parser.add_argument("--tools", help="tools to run on every workload (default: all, but only fetcher, stock "
                        "and aria2c on F); fetcher is the base of the ratios")
    parser.add_argument("--nice", type=int, default=0,
                        help="run the bench (servers and tools) in a session of its own at this niceness: "
                        "-20 on a machine that other processes keep busy leaves them a few per cent")
    args = parser.parse_args()
    keys = [k.strip().upper() for k in args.only.split(",") if k.strip()]
    tools = [t.strip() for t in (args.tools or ",".join(TOOLS)).split(",") if t.strip()]
    if unknown := [k for k in keys if k not in WORKLOADS] + [t for t in tools if t not in TOOLS]:
        raise SystemExit(f"unknown workload or tool: {unknown}")
    if os.geteuid() != 0:
        raise SystemExit("run as root: the bench mounts tmpfs (and may apt-get install nginx and the peers)")
    if args.nice:
        isolate(args.nice)
    compile_sources()
    begun = time.perf_counter()
    binaries = find_binaries(tools)
    pyplot()  # installed now rather than after the runs
    workloads = [WORKLOADS[k] for k in keys]
    # tmpfs sizes: every source at once; one tool's download at a time (+ state, .part and control files).
    www_mb = sum(w.total for w in workloads if w.server == "nginx") // MIB + sum(w.files for w in workloads) * 4 // KIB + 64
    dl_mb = max((w.total for w in workloads), default=0) // MIB + max((w.files for w in workloads), default=0) * 4 // KIB + 256
    if mem_available_mb() < www_mb + dl_mb + 2048:
        raise SystemExit(f"{mem_available_mb()} MiB of memory available, the tmpfs mounts need {www_mb + dl_mb} MiB "
                         "and the tools about 2 GiB more: leave out C (--only A,B,D,E,F)")
    background = background_load()
    if background > 0.1:
        print(f"warning: the machine is {background:.0%} busy before the bench starts (other processes): "
              "the figures will say little", flush=True)

    work = Path(tempfile.mkdtemp(prefix="fetcher-bench-peers-"))
    work.chmod(0o755)  # nginx's worker runs as nobody and must reach www/
    www, dl = work / "www", work / "dl"
    setup = Setup(work, dl)
    nginx = origin = None
    origin_url = ""
    runs: list[Run] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        mount_tmpfs(www, www_mb)
        mount_tmpfs(dl, dl_mb)
        nginx, port = start_nginx(binaries["nginx"], work, www, extra=SLOW_LOCATION)
        base = f"http://127.0.0.1:{port}"
        if any(w.server == "origin" for w in workloads):
            origin, origin_url = start_origin(env)
        started = time.perf_counter()
        for w in workloads:
            write_files(w, www, origin_url if w.server == "origin" else base, setup)
        warm(dl, max(w.total for w in workloads))
        print(f"files written in {time.perf_counter() - started:.1f} s ({www_mb} MiB tmpfs for them, "
              f"{dl_mb} MiB for downloads)", flush=True)
        servers = process_tree(nginx.pid) + ([origin.pid] if origin else [])
        servers_before, ticks_before, self_before = cpu_seconds(servers), machine_ticks(), sum(os.times()[:2])
        for w in workloads:
            rounds = args.rounds or w.rounds
            mine = tools if args.tools else [t for t in tools if t in w.tools]
            for r in range(rounds):
                for tool in mine:
                    run = run_once(tool, w, r, setup, binaries)
                    runs.append(run)
                    last = f"{run.last:6.2f}" if run.last is not None else "     -"
                    print(f"{w.key} round {r + 1}/{rounds} {tool:7s} wall {run.wall:6.2f} s  last file {last} s  "
                          f"RSS {run.rss:6.0f} MiB  CPU {run.cpu:6.2f} s  "
                          f"{'ok' if run.ok else 'FAILED: ' + run.why}", flush=True)
                clean(dl)
        ticks_after = machine_ticks()
        ours = sum(r.cpu for r in runs) + cpu_seconds(servers) - servers_before + sum(os.times()[:2]) - self_before
        others = max(0.0, ((ticks_after[0] - ticks_before[0]) / TICKS - ours)
                      / max((ticks_after[1] - ticks_before[1]) / TICKS, 1e-9))
    finally:
        if nginx is not None:
            stop(nginx)
        if origin is not None:
            stop(origin)
        unmount(www)
        unmount(dl)
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - begun
    info = versions(binaries)
    header = [
        (f"# fetcher and its peers ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
         f"{mem_available_mb() // 1024} GiB available)"),
        "",
        (f"Concurrency 64; nginx (1 worker) and the test origin on 127.0.0.1, sources and downloads on tmpfs; "
         f"rounds: {', '.join(f'{w.key} {args.rounds or w.rounds}' for w in workloads)}; "
         f"the whole bench took {elapsed / 60:.1f} min. Machine {background:.0%} busy before it started; "
         f"during the runs, other processes (and kernel time no process was charged with) "
         f"took {others:.0%} of its cores."),
        *(["E: curl refuses an empty config (\"no URL specified!\", exit 2); that counts as done here."]
          if "E" in keys and "curl" in tools else []),
        "Versions: " + "; ".join(info[n] for n in ("scrapy", *[t for t in ("aria2c", "curl", "wget2") if t in info],
                                                    "nginx")) + ".",
    ]
    text = report(runs, keys, tools, header)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "peers.md").write_text(text)
    (OUT / "peers.json").write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n")
    chart(runs, keys, tools, OUT / "peers.png")
    print("\n" + text + f"\nwritten: {OUT / 'peers.md'}, peers.json, peers.png", flush=True)


if __name__ == "__main__":
    main()
