"""Benchmark: one worker against two on one shared queue (issue 8's goal).

Run by hand, as root (it mounts tmpfs and may apt-get install nginx):

    .venv/bin/python -m bench.queue                  # 2,000 x 16 KiB, 3 rounds
    .venv/bin/python -m bench.queue --rounds 5 --store own

Goal: on one machine, 2 workers on one queue give at least 1.6x the throughput
of one worker on many small files. Each round runs A then B, so that a noisy
neighbour hurts both alike; the report gives medians and B/A ratios from the
same run, and writes them to bench/out/queue.md.

  A  `scrapy enqueue` of the list, then 1 worker (`scrapy crawl fetch -a list=redis://...`)
  B  `scrapy enqueue` of the list, then 2 workers started together

Every run has a queue of its own (a queue remembers every URL it has seen).
Untimed: the enqueue. Timed from the moment the workers are started:

  wall       to the last worker's exit (Python start-up, and the idle wait
             FETCHER_QUEUE_IDLE before a worker ends, included)
  last file  to the latest finished_at in the workers' manifests: the download
             time, without the idle wait at the end
  files/s    files / last file
  CPU/file   user+sys seconds of the worker processes (wait4) / files
  srv/file   CPU seconds of nginx (master + worker) and redis-server over the run / files
  cores used (workers' + nginx's + redis's CPU seconds) / wall
  busy       the machine's busy share of all its cores over the run (/proc/stat),
             other processes included

The origin is our own nginx (worker_processes 1, access_log off, sendfile on,
on 127.0.0.1 and a free port) serving generated files from a tmpfs mounted for
the run; the workers write to a second tmpfs (this VM's ext4 makes file
creation times vary 20x between runs). redis-server is our own too, on a free
port, without persistence. Everything is stopped and unmounted at the end.
Each run is checked: every file in the store(s), byte for byte, and one
manifest record per URL.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench.machine import (
    ROOT,
    SCRAPY,
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
from tests.redis_server import RedisServer

OUT = ROOT / "bench" / "out" / "queue.md"





@dataclass
class Result:
    wall: float
    last: float  # seconds from start to the latest finished_at
    cpu: float  # workers' user + sys seconds
    servers: float  # nginx + redis CPU seconds
    busy: float  # machine busy share, 0..1
    first: float  # seconds from start to the earliest finished_at
    split: list[int]  # files each worker downloaded

    @property
    def used(self) -> float:
        """Cores kept busy by the workers, nginx and redis, on average over the wall time."""
        return (self.cpu + self.servers) / self.wall


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found:
        return found
    print("nginx is missing: apt-get install -y nginx-light", flush=True)
    # RUNLEVEL=1: the package's own nginx service is not started on port 80.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    for package in ("nginx-light", "nginx"):
        if subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, check=False).returncode == 0:
            break
    else:
        raise SystemExit("could not install nginx (apt-get install -y nginx-light, or nginx)")
    return shutil.which("nginx") or "/usr/sbin/nginx"


def parse_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()  # "...Z" parses since Python 3.11


def clean(store: Path) -> None:
    for child in store.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def check(stores: list[Path], expected: dict[str, str], size: int) -> tuple[float, float, list[int]]:
    """Every file present once, byte for byte, and one downloaded record per URL.
    -> (earliest and latest finished_at, records per store)."""
    found: dict[str, Path] = {}
    for store in stores:
        for path in store.rglob("*.bin"):
            if path.name in found:
                raise SystemExit(f"{path.name} is in two stores: {found[path.name]} and {path}")
            found[path.name] = path
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise SystemExit(f"store check failed: {len(missing)} files missing {missing[:3]}, "
                         f"{len(extra)} unexpected {extra[:3]}")
    for name, path in found.items():
        data = path.read_bytes()
        if len(data) != size or hashlib.sha256(data).hexdigest() != expected[name]:
            raise SystemExit(f"{path}: {len(data)} bytes, not the {size} served, or other bytes")
    earliest, latest = float("inf"), 0.0
    split = []
    urls: set[str] = set()
    for store in stores:
        records = [json.loads(line) for line in (store / "manifest.jsonl").read_text().splitlines()]
        split.append(len(records))
        for record in records:
            if record["status"] != "downloaded" or record["size"] != size:
                raise SystemExit(f"bad record: {record}")
            if record["url"] in urls:
                raise SystemExit(f"downloaded twice: {record['url']}")
            urls.add(record["url"])
            stamp = parse_time(record["finished_at"])
            earliest, latest = min(earliest, stamp), max(latest, stamp)
    if len(urls) != len(expected):
        raise SystemExit(f"{len(urls)} manifest records for {len(expected)} URLs")
    return earliest, latest, split


def run(workers: int, queue_url: str, stores: list[Path], work: Path, env: dict[str, str],
        common: list[str], servers: list[int]) -> tuple[float, float, float, float, float]:
    """Start the workers together, wait for all. -> (start epoch, wall, workers' CPU, servers' CPU, busy)."""
    cmds = [[SCRAPY, "crawl", "fetch", "-a", f"list={queue_url}", *common, "-s", f"FILES_STORE={stores[i % len(stores)]}"]
            for i in range(workers)]
    server_pids = [p for pid in servers for p in process_tree(pid)]
    servers_before = cpu_seconds(server_pids)
    busy_before, total_before = machine_ticks()
    epoch = time.time()
    started = time.perf_counter()
    pids = [spawn(cmd, work, env, work / f"worker{i}.log") for i, cmd in enumerate(cmds)]
    cpu = 0.0
    failed = []
    try:
        for i, pid in enumerate(pids):
            _, status, usage = os.wait4(pid, 0)
            pids[i] = 0
            cpu += usage.ru_utime + usage.ru_stime
            if os.waitstatus_to_exitcode(status) != 0:
                failed.append(i)
    finally:
        for pid in pids:  # interrupted: stop the workers still running, ours only
            if pid:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    wall = time.perf_counter() - started
    busy_after, total_after = machine_ticks()
    servers_cpu = cpu_seconds(server_pids) - servers_before
    if failed:
        tail = (work / f"worker{failed[0]}.log").read_text()[-3000:]
        raise SystemExit(f"worker {failed[0]} failed:\n{tail}")
    busy = (busy_after - busy_before) / max(total_after - total_before, 1)
    return epoch, wall, cpu, servers_cpu, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=16384, help="bytes per file")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="workers in variant B")
    parser.add_argument("--idle", default="0.5", help="FETCHER_QUEUE_IDLE; the worker polls every 0.5 s, "
                        "so no positive value below 0.5 ends it sooner")
    parser.add_argument("--store", choices=("shared", "own"), default="shared",
                        help="B's workers write to one store, or each to its own (both on the tmpfs)")
    parser.add_argument("-s", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                        help="another Scrapy setting for every worker (repeatable)")
    parser.add_argument("--nice", type=int, default=0,
                        help="run the bench (nginx, redis, workers) in a session of its own at this niceness: "
                        "-20 on a machine that other processes keep busy leaves them a few per cent")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the bench mounts tmpfs (and may apt-get install nginx)")
    if args.nice:
        isolate(args.nice)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    signal.signal(signal.SIGTERM, interrupted)  # clean up (unmount, stop servers) on a plain kill too

    compile_sources()
    background = background_load()
    if background > 0.1:
        print(f"warning: the machine is {background:.0%} busy before the bench starts (other processes): "
              "the figures will say little", flush=True)
    work = Path(tempfile.mkdtemp(prefix="fetcher-bench-queue-"))
    work.chmod(0o755)  # nginx's worker runs as nobody and must reach www/
    www, stores_dir = work / "www", work / "stores"
    payload_mb = args.files * max(args.size, 4096) // 2**20 + 1
    nginx = redis_server = None
    try:
        mount_tmpfs(www, payload_mb + 16)
        mount_tmpfs(stores_dir, 2 * payload_mb + 256)
        expected = {}
        for i in range(args.files):
            data = os.urandom(args.size)
            (www / f"f{i}.bin").write_bytes(data)
            expected[f"f{i}.bin"] = hashlib.sha256(data).hexdigest()
        nginx, port = start_nginx(nginx_binary(), work, www)
        redis_server = RedisServer(work / "redis")
        (work / "urls.txt").write_text("".join(f"http://127.0.0.1:{port}/f{i}.bin\n" for i in range(args.files)))
        env = {**os.environ, "SCRAPY_SETTINGS_MODULE": "fetcher.settings",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("SCRAPY_PROJECT", None)
        common = ["-s", "FETCHER_PROGRESS=off", "-s", "CONCURRENT_REQUESTS=64", "-s", "CONCURRENT_REQUESTS_PER_DOMAIN=64",
                  "-s", f"FETCHER_QUEUE_IDLE={args.idle}"]
        for setting in args.settings:
            common += ["-s", setting]
        variants = {"A": 1, "B": args.workers}
        results: dict[str, list[Result]] = {v: [] for v in variants}
        tag = f"{os.getpid()}-{int(time.time())}"
        for r in range(args.rounds):
            for name, workers in variants.items():
                count = workers if args.store == "own" else 1
                stores = [stores_dir / f"store{i}" for i in range(count)]
                clean(stores_dir)
                for store in stores:
                    store.mkdir()
                queue_url = redis_server.url(f"bench-{tag}-r{r}-{name}")
                enq = subprocess.run([SCRAPY, "enqueue", queue_url, "urls.txt"], cwd=work, env=env,
                                     capture_output=True, text=True, check=False)
                if enq.returncode != 0 or f"Enqueued {args.files} URLs" not in enq.stderr:
                    raise SystemExit(f"enqueue failed:\n{enq.stderr[-3000:]}")
                epoch, wall, cpu, servers, busy = run(workers, queue_url, stores, work, env, common,
                                                      [nginx.pid, redis_server.proc.pid])
                earliest, latest, split = check(stores, expected, args.size)
                if args.store == "shared" and workers > 1:
                    split = worker_split(stores[0])
                res = Result(wall, latest - epoch, cpu, servers, busy, earliest - epoch, split)
                results[name].append(res)
                print(f"round {r + 1} {name}: wall {wall:5.2f} s  first file {res.first:4.2f} s  last {res.last:5.2f} s  "
                      f"{args.files / res.last:6.0f} files/s  CPU {cpu:5.2f} s (servers {servers:4.2f} s)  "
                      f"cores used {(cpu + servers) / wall:4.2f}  machine busy {busy:4.0%}  files per worker {split}", flush=True)
                clean(stores_dir)
    finally:
        if nginx is not None:
            stop(nginx)
        if redis_server is not None:
            redis_server.stop()
        unmount(www)
        unmount(stores_dir)
        shutil.rmtree(work, ignore_errors=True)
    report(args, results, background)


def interrupted(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def worker_split(store: Path) -> list[int]:
    """Files per worker in a shared store, from the manifest's run ids (one per worker process)."""
    runs: dict[str, int] = {}
    for line in (store / "manifest.jsonl").read_text().splitlines():
        run_id = json.loads(line).get("run") or "?"
        runs[run_id] = runs.get(run_id, 0) + 1
    return sorted(runs.values(), reverse=True)


def report(args: argparse.Namespace, results: dict[str, list[Result]], background: float) -> None:
    def med(name: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in results[name])

    files = args.files
    size = f"{args.size // 1024} KiB" if args.size % 1024 == 0 else f"{args.size} B"
    lines = [
        (f"{files:,} x {size} from nginx on tmpfs (127.0.0.1), store on tmpfs ({args.store} store in B), "
         f"{os.cpu_count()} cores, FETCHER_QUEUE_IDLE={args.idle}, CONCURRENT_REQUESTS=64 per worker; "
         f"median of {args.rounds} rounds, A and B interleaved; machine {background:.0%} busy before the bench"
         f"{f', bench at nice {args.nice}' if args.nice else ''}."),
        "",
        "| variant | wall s | last file s | files/s | worker CPU ms/file | nginx+redis CPU ms/file | cores used | machine busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"A": "A: 1 worker", "B": f"B: {args.workers} workers"}
    for name in results:
        lines.append(
            f"| {labels[name]} | {med(name, 'wall'):.2f} | {med(name, 'last'):.2f} | {files / med(name, 'last'):.0f} "
            f"| {med(name, 'cpu') / files * 1000:.2f} | {med(name, 'servers') / files * 1000:.2f} "
            f"| {med(name, 'used'):.2f} | {med(name, 'busy'):.0%} |")
    by_last = med("A", "last") / med("B", "last")
    by_wall = med("A", "wall") / med("B", "wall")
    lines += [
        "",
        (f"B/A throughput: **{by_last:.2f}x** by time to the last file, {by_wall:.2f}x by wall "
         f"(goal: at least 1.6x)."),
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"(written to {OUT.relative_to(ROOT)})")


if __name__ == "__main__":
    main()
