"""Benchmark: what the progress display costs, and fetcher against stock FilesPipeline.

Run by hand (never in the test suite):

    .venv/bin/python -m bench.progress               # 5,000 x 16 KiB, 3 rounds
    .venv/bin/python -m bench.progress --files 2000 --rounds 5

Each round runs every variant once, interleaved, so that a noisy neighbour hurts
them all alike; the report gives medians and ratios against ``off`` from the same
run. Files are served from memory by the test origin on 127.0.0.1 and written to
tmpfs (/dev/shm), so the disk's erratic timings stay out of it.

Variants:
  off    fetcher, FETCHER_PROGRESS=off, on a terminal
  bar    fetcher with the live progress bar, on a terminal (a pseudo-terminal)
  log    fetcher's plain progress lines (no terminal, one line a second)
  stock  stock Scrapy FilesPipeline on the same list, same concurrency
"""

from __future__ import annotations

import argparse
import os
import pty
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.machine import ROOT, SCRAPY, compile_sources
from tests.origin import Origin

STOCK_SPIDER = """
import scrapy

class Stock(scrapy.Spider):
    name = "stock"
    custom_settings = {"ITEM_PIPELINES": {"scrapy.pipelines.files.FilesPipeline": 1}}

    async def start(self):
        with open(self.list) as f:
            for line in f:
                yield {"file_urls": [line.strip()]}
"""


def run(cmd: list[str], cwd: Path, env: dict[str, str], terminal: bool) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one crawl process."""
    started = time.perf_counter()
    if terminal:
        pid, master = pty.fork()
        if pid == 0:
            os.chdir(cwd)
            os.execve(cmd[0], cmd, env)
        while True:  # drain the terminal so the child never blocks on it
            try:
                if not os.read(master, 65536):
                    break
            except OSError:
                break
        os.close(master)
    else:
        pid = os.fork()
        if pid == 0:
            os.chdir(cwd)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.execve(cmd[0], cmd, env)
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed with {status}")
    return elapsed, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--size", default="16k")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="off,bar,log,stock")
    args = parser.parse_args()

    compile_sources()
    origin = Origin().start()
    origin.record_requests = False
    work = Path(tempfile.mkdtemp(prefix="fetcher-bench-"))
    store = Path(tempfile.mkdtemp(prefix="fetcher-bench-", dir="/dev/shm"))
    (work / "urls.txt").write_text("".join(f"{origin.url}/gen/{args.size}/f{i}.bin\n" for i in range(args.files)))
    (work / "stock.py").write_text(STOCK_SPIDER)
    env = {**os.environ, "SCRAPY_SETTINGS_MODULE": "fetcher.settings", "PYTHONPATH": str(ROOT), "TERM": "xterm"}
    common = ["-s", f"FILES_STORE={store}", "-s", "CONCURRENT_REQUESTS=64", "-s", "CONCURRENT_REQUESTS_PER_DOMAIN=16"]
    variants = {
        "off": ([SCRAPY, "crawl", "fetch", "-a", "list=urls.txt", "-s", "FETCHER_PROGRESS=off", *common], True),
        "bar": ([SCRAPY, "crawl", "fetch", "-a", "list=urls.txt", "-s", "FETCHER_PROGRESS=bar", *common], True),
        "log": ([SCRAPY, "crawl", "fetch", "-a", "list=urls.txt", "-s", "FETCHER_PROGRESS=log",
                 "-s", "FETCHER_PROGRESS_INTERVAL=1", *common], False),
        "stock": ([SCRAPY, "runspider", "stock.py", "-a", "list=urls.txt", "-s", "LOG_LEVEL=INFO",
                   "-s", "TELNETCONSOLE_ENABLED=False", "-s", "REMOTE_CONTROL_ENABLED=False", *common], False),
    }
    chosen = [v for v in args.variants.split(",") if v]
    times: dict[str, list[float]] = {v: [] for v in chosen}
    rss: dict[str, list[float]] = {v: [] for v in chosen}
    try:
        for r in range(args.rounds):
            for name in chosen:
                cmd, terminal = variants[name]
                shutil.rmtree(store)
                store.mkdir()
                seconds, peak = run(cmd, work, env, terminal)
                times[name].append(seconds)
                rss[name].append(peak)
                print(f"round {r + 1} {name:5s} {seconds:6.2f} s  {peak:6.1f} MiB", flush=True)
    finally:
        origin.stop()
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times["off"]) if "off" in times else None
    print(f"\n{args.files} x {args.size}, median of {args.rounds} rounds (tmpfs store, origin on 127.0.0.1):")
    for name in chosen:
        median = statistics.median(times[name])
        ratio = f"  {median / base:.2f}x off" if base else ""
        print(f"  {name:5s} {median:6.2f} s  {args.files / median:7.0f} files/s  "
              f"peak RSS {max(rss[name]):6.1f} MiB{ratio}")


if __name__ == "__main__":
    main()
