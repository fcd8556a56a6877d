"""What the benchmarks share about the machine: their nginx, free ports, tmpfs
mounts, processes and their CPU time, how busy the machine is, and running in a
session of its own."""

from __future__ import annotations

import compileall
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRAPY = str(Path(sys.executable).with_name("scrapy"))
TICKS = os.sysconf("SC_CLK_TCK")  # /proc's CPU times are in these
#: The benchmarks' own nginx: one worker, loopback only, no logs; ``extra`` adds server lines.
NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {work}/nginx-tmp/body;
    proxy_temp_path {work}/nginx-tmp/proxy;
    fastcgi_temp_path {work}/nginx-tmp/fastcgi;
    uwsgi_temp_path {work}/nginx-tmp/uwsgi;
    scgi_temp_path {work}/nginx-tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {www};{extra}
    }}
}}
"""


def compile_sources() -> None:
    """Byte-compile fetcher and the bench's spiders before any run, as ``pip install`` does.
    Under PYTHONDONTWRITEBYTECODE (set in some shells and CI images) every run compiled
    fetcher's sources again, about 50 ms a process that an installed fetcher, like stock
    Scrapy from site-packages, never pays."""
    for folder in ("fetcher", "bench"):
        compileall.compile_dir(ROOT / folder, quiet=1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen) -> bool:  # type: ignore[type-arg]
    """Whether *proc* listens on 127.0.0.1:*port* within 10 s (False once it has exited)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def start_nginx(binary: str, work: Path, www: Path, extra: str = "") -> tuple[subprocess.Popen[bytes], int]:
    """The benchmarks' nginx (NGINX_CONF, *extra* server lines) serving *www* on a free port."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / "nginx-tmp" / sub).mkdir(parents=True, exist_ok=True)
    for _attempt in range(3):  # the free port may be taken before nginx binds it
        port = free_port()
        conf = work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(extra=extra, work=work, www=www, port=port))
        proc = subprocess.Popen([binary, "-p", str(work), "-e", str(work / "nginx-error.log"), "-c", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait_listening(port, proc):
            return proc, port
        stop(proc)
    log = work / "nginx-error.log"
    raise SystemExit(f"nginx did not start: {log.read_text()[-2000:] if log.exists() else ''}")


def mount_tmpfs(path: Path, size_mb: int) -> None:
    path.mkdir(mode=0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)], check=True)


def unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", str(path)], check=False)


def spawn(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(cwd)
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.execve(cmd[0], cmd, env)
        finally:
            os._exit(127)
    return pid


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            for child in children:
                pids += process_tree(int(child))
    except OSError:
        pass
    return pids


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # without guest time, which is counted in user already
    return total - idle, total


def background_load(seconds: float = 1.0) -> float:
    """The machine's busy share over a second, before anything of ours runs."""
    busy_before, total_before = machine_ticks()
    time.sleep(seconds)
    busy_after, total_after = machine_ticks()
    return (busy_after - busy_before) / max(total_after - total_before, 1)


def isolate(nice: int) -> None:
    """Go on in a child in a session of its own, at this niceness, the parent
    waiting and passing Ctrl-C on. With the kernel's autogroups (Debian's
    default), a session competes with every other session as one, whatever
    its processes' nice values: a new session with a lowered autogroup nice
    is what gives nginx, redis and the workers the CPU over other load."""
    pid = os.fork()
    if pid:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, _frame: os.kill(pid, signum))
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        sys.exit(128 - code if code < 0 else code)  # killed by a signal: the shell's 128 + N
    os.setsid()
    try:
        Path("/proc/self/autogroup").write_text(str(nice))
    except OSError:
        pass  # no autogroups: nice alone does it
    os.setpriority(os.PRIO_PROCESS, 0, nice)


def stop(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """End a server we started: its stdin closed (the test origin's signal), then TERM, then KILL."""
    if proc.stdin:
        proc.stdin.close()
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
