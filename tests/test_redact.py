"""Credentials in URLs never reach logs, records, the manifest or the summary;
failed.txt keeps each entry as given, so that a rerun still works."""

from __future__ import annotations

import socket
import stat

from fetcher.redact import host_of, safe_line, safe_text, safe_url
from tests.conftest import Fetch
from tests.origin import Origin


def test_the_formatter() -> None:
    assert safe_url("http://alice:s3cret@host:81/x?y=1") == "http://***@host:81/x?y=1"
    assert safe_url("http://alice@host/x") == "http://***@host/x"
    assert safe_url("http://host/a@b") == "http://host/a@b"  # an @ in the path is not userinfo
    assert safe_url("ftp://u:p@h/") == "ftp://***@h/"
    assert host_of("https://alice:s3cret@Host.Example:8443/x") == "host.example:8443"
    assert host_of("not a url") == "(no host)"
    text = "connection to alice:s3cret@127.0.0.1:9 failed for http://alice:s3cret@127.0.0.1:9/x"
    assert "s3cret" not in safe_text(text, "http://alice:s3cret@127.0.0.1:9/x")
    assert safe_line("http://a:b@h/x sha256=zz") == "http://***@h/x sha256=zz"
    assert safe_line("  header=authorization: Bearer abc") == "  header=authorization: ***"
    assert safe_line("  header=Accept: */*") == "  header=Accept: */*"


def _refusing_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_no_password_in_any_output(fetch: Fetch, origin: Origin) -> None:
    dead = f"http://alice:s3cret@127.0.0.1:{_refusing_port()}/x.bin"
    missing = f"http://bob:hunter2@127.0.0.1:{origin.port}/status/404"
    bad = f"http://carol:pw0rd@127.0.0.1:{origin.port}/x.bin sha256=not-hex"  # a bad line, reported
    run = fetch(f"{dead}\n{missing}\n  header=Authorization: Bearer t0ken\n{bad}\n",
                settings={"RETRY_TIMES": 0, "LOG_LEVEL": "DEBUG"})
    assert run.returncode == 1
    outputs = {
        "log": run.log,
        "manifest": (run.store / "manifest.jsonl").read_text(),
        "failed.txt comments": "".join(line for line in (run.store / "failed.txt").read_text().splitlines(True)
                                       if line.startswith("#")),
    }
    for where, text in outputs.items():
        for secret in ("s3cret", "hunter2", "t0ken", "pw0rd"):
            assert secret not in text, f"{secret} in the {where}"
    assert "connection refused by 127.0.0.1" in outputs["manifest"]
    assert "http://***@127.0.0.1" in outputs["manifest"]
    failed = (run.store / "failed.txt").read_text()
    assert dead in failed and missing in failed and "header=Authorization: Bearer t0ken" in failed  # rerunnable
    assert stat.S_IMODE((run.store / "failed.txt").stat().st_mode) == 0o600
