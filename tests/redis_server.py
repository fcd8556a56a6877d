"""A throwaway redis-server (Debian's package) on a free 127.0.0.1 port, for the queue tests:
no persistence, loopback only, stopped at the end. `.ci/run` installs redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``redis-server`` on its own port; ``url()`` is what fetcher takes."""

    def __init__(self, workdir: Path | None = None, *extra: str) -> None:
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not installed (apt-get install -y redis-server; .ci/run does it)")
        self.password = extra[extra.index("--requirepass") + 1] if "--requirepass" in extra else None
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="fetcher-redis-")
        workdir = workdir if workdir is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        workdir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):  # the free port may be taken before the server binds it
            self.port = free_port()
            self.log = workdir / f"redis-{self.port}.log"
            with self.log.open("wb") as log:
                self.proc = subprocess.Popen(
                    [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--daemonize", "no", "--dir", str(workdir), *extra],
                    stdout=log, stderr=subprocess.STDOUT)
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"redis-server did not start: {self.log.read_text()[-2000:]}")

    def _wait_ready(self) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.ConnectionError:
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def url(self, queue: str | None = None, *, password: str | None = None) -> str:
        auth = f":{password}@" if password is not None else ""
        query = f"?queue={queue}" if queue else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0{query}"

    def client(self) -> Any:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, decode_responses=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(15)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
