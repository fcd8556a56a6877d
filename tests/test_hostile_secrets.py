"""No secret reaches any output, at any log level: redirect loops, HEAD requests, mirrors,
list URLs, Referer, Scrapy's own start-up and redirect lines; and a header=Cookie reaches the
server exactly as given."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import SCRAPY, Fetch, Run
from tests.origin import Origin, content_bytes

SECRET = "PASSWORDx9"  # in every URL's userinfo below


def outputs(run: Run, *extra: Path) -> dict[str, str]:
    """Everything a person or a program reads after a run, but failed.txt's entries (kept as given)."""
    found = {"log": run.log + run.stdout}
    for path in (run.store / "manifest.jsonl", *extra):
        if path.exists():
            found[path.name] = path.read_text()
    failed = run.store / "failed.txt"
    if failed.exists():
        found["failed.txt comments"] = "".join(x for x in failed.read_text().splitlines(True) if x.startswith("#"))
    return found


def assert_no_secret(run: Run, *extra: Path) -> None:
    for where, text in outputs(run, *extra).items():
        assert SECRET not in text, f"the password is in the {where}:\n{text[-3000:]}"


def test_a_redirect_loop_with_credentials(fetch: Fetch, origin: Origin) -> None:
    url = f"http://kim:{SECRET}@127.0.0.1:{origin.port}/loop2/a/x.bin"
    run = fetch(f"{url}\n", settings={"LOG_LEVEL": "DEBUG"})
    assert run.returncode == 1
    assert "redirect loop" in run.manifest[0]["error"]
    assert_no_secret(run)


def test_a_relative_redirect_at_debug_shows_no_credentials(fetch: Fetch, origin: Origin) -> None:
    url = f"http://kim:{SECRET}@127.0.0.1:{origin.port}/redirect/1/gen/1k/moved.bin"
    run = fetch(f"{url}\n", settings={"LOG_LEVEL": "DEBUG"})
    assert run.returncode == 0, run.log[-3000:]
    assert_no_secret(run)


def test_the_head_request_sends_the_credentials_as_authorization(fetch: Fetch, origin: Origin) -> None:
    """A file on disk with no record is checked with a HEAD: through fetcher's own handler, so
    the URL's credentials go as Authorization, never into a host name or an error."""
    path = "/gen/8k/headcheck.bin"
    url = f"http://erin:{SECRET}@127.0.0.1:{origin.port}{path}"
    first = fetch(f"{url}\n")
    assert first.returncode == 0, first.log[-3000:]
    (first.store / ".fetcher").rename(fetch.cwd / "old-state")  # the file stays; its record is gone
    (first.store / "manifest.jsonl").unlink()
    origin.reset_stats()
    run = fetch(f"{url}\n", settings={"FILES_EXPIRES": 100_000})  # the origin's files date from 2024
    assert run.returncode == 0, run.log[-3000:]
    heads = [r for r in origin.stats.snapshot().requests if r["method"] == "HEAD" and r["path"] == path]
    assert heads and heads[0]["headers"].get("authorization", "").startswith("Basic "), heads
    assert run.record(url.replace(f"erin:{SECRET}", "***"))["status"] == "uptodate"
    assert_no_secret(run)


def test_split_downloads_send_the_credentials_too(fetch: Fetch, origin: Origin) -> None:
    path = "/gen/2m/split-auth.bin"
    url = f"http://erin:{SECRET}@127.0.0.1:{origin.port}{path}"
    run = fetch(f"{url} split=4\n", settings={"FETCHER_MIN_SPLIT_SIZE": 256 * 1024})
    assert run.returncode == 0, run.log[-3000:]
    seen = [r for r in origin.stats.snapshot().requests if r["path"] == path]
    assert sum(r["status"] == 206 for r in seen) == 4, seen  # split, so its HEAD worked
    assert all(r["headers"].get("authorization", "").startswith("Basic ") for r in seen)
    assert_no_secret(run)


def test_mirrors_with_credentials_are_redacted_in_records_and_feeds(fetch: Fetch, origin: Origin) -> None:
    dead = f"http://mo:{SECRET}@127.0.0.1:{origin.port}/status/404"
    mirror = f"http://mo:{SECRET}@127.0.0.1:{origin.port}/gen/1k/mirrored.bin"
    run = fetch(f"{dead}\t{mirror}\n", "-O", "items.jsonl")
    assert run.returncode == 0, run.log[-3000:]
    assert run.manifest[0]["mirror"] == mirror.replace(f"mo:{SECRET}", "***")
    assert_no_secret(run, fetch.cwd / "items.jsonl")


def test_a_failing_list_url_with_credentials(fetch: Fetch, origin: Origin) -> None:
    run = fetch(None, "-a", f"list=http://mo:{SECRET}@127.0.0.1:{origin.port}/status/404",
                settings={"RETRY_TIMES": 0})
    assert run.returncode == 1
    assert "cannot fetch the list" in run.log
    assert_no_secret(run)


def test_referer_star_sends_no_userinfo(fetch: Fetch, origin: Origin) -> None:
    path = "/gen/1k/referred.bin"
    url = f"http://kim:{SECRET}@127.0.0.1:{origin.port}{path}"
    run = fetch(f"{url}\n  referer=*\n")
    assert run.returncode == 0, run.log[-3000:]
    [seen] = [r for r in origin.stats.snapshot().requests if r["path"] == path]
    assert seen["headers"]["referer"] == f"http://127.0.0.1:{origin.port}{path}"


def test_passwords_with_slash_or_hash_and_bad_ipv6(fetch: Fetch, origin: Origin) -> None:
    lines = [f"http://kim:pa/{SECRET}@127.0.0.1:{origin.port}/x.bin",
             f"http://kim:pa#{SECRET}@127.0.0.1:{origin.port}/y.bin",
             f"http://kim:{SECRET}@[::1/z.bin"]
    run = fetch("\n".join(lines) + "\n", settings={"LOG_LEVEL": "DEBUG"})
    assert run.returncode == 1
    assert_no_secret(run)


def test_scrapys_own_settings_lines_show_no_secret(fetch: Fetch, origin: Origin) -> None:
    """Scrapy logs its overridden settings (shown at DEBUG; with the add-on in another project,
    at INFO): AWS keys and an ftp:// store's password must not be in them."""
    run = fetch(f"{origin.url}/gen/1k/s.bin\n", settings={
        "LOG_LEVEL": "DEBUG", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": SECRET})
    assert run.returncode == 0, run.log[-3000:]
    assert "AWS_SECRET_ACCESS_KEY" in run.log  # the line is there, its value is not
    assert_no_secret(run)
    ftp = fetch(f"{origin.url}/gen/1k/f.bin\n",
                settings={"LOG_LEVEL": "DEBUG", "FILES_STORE": f"ftp://u:{SECRET}@127.0.0.1:9/files"})
    assert ftp.returncode == 1 and "Cannot start" in ftp.log
    assert_no_secret(ftp)


def test_a_project_with_the_addon_logs_no_secret(tmp_path: Path, origin: Origin) -> None:
    """Another project (its own commands, Scrapy's INFO "Overridden settings" line) with the add-on."""
    project = tmp_path / "proj"
    (project / "proj" / "spiders").mkdir(parents=True)
    (project / "scrapy.cfg").write_text("[settings]\ndefault = proj.settings\n")
    (project / "proj" / "__init__.py").write_text("")
    (project / "proj" / "spiders" / "__init__.py").write_text(
        "import scrapy\n\n\nclass One(scrapy.Spider):\n    name = 'one'\n\n"
        "    async def start(self):\n"
        f"        yield {{'file_urls': ['{origin.url}/gen/1k/addon.bin']}}\n")
    (project / "proj" / "settings.py").write_text(
        "BOT_NAME = 'proj'\nSPIDER_MODULES = ['proj.spiders']\nADDONS = {'fetcher.Addon': 0}\n"
        f"FILES_STORE = 'files'\nAWS_SECRET_ACCESS_KEY = '{SECRET}'\nTELNETCONSOLE_ENABLED = False\n"
        "REMOTE_CONTROL_ENABLED = False\n")
    env = dict(Fetch(tmp_path).env())
    env.pop("SCRAPY_SETTINGS_MODULE", None)
    proc = subprocess.run([SCRAPY, "crawl", "one"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Overridden settings" in proc.stderr and SECRET not in proc.stderr + proc.stdout


def test_a_cookie_header_reaches_the_server_as_given(fetch: Fetch, origin: Origin) -> None:
    path = "/gen/1k/cookie.bin"
    run = fetch(f"{origin.url}{path}\n  header=Cookie: session=abc; theme=dark\n")
    assert run.returncode == 0, run.log[-3000:]
    [seen] = [r for r in origin.stats.snapshot().requests if r["path"] == path]
    assert seen["headers"].get("cookie") == "session=abc; theme=dark", seen["headers"]
    assert (run.store / run.manifest[0]["path"]).read_bytes() == content_bytes("cookie.bin", 1024)


def test_a_cookie_header_does_not_follow_a_redirect_to_another_host(fetch: Fetch, origin: Origin) -> None:
    with Origin(host="127.0.0.2").start() as other:
        target = f"{other.url}/gen/1k/elsewhere.bin"
        run = fetch(f"{origin.url}/goto?to={target}\n  header=Cookie: session=abc\n")
        assert run.returncode == 0, run.log[-3000:]
        [there] = [r for r in other.stats.snapshot().requests if r["path"] == "/gen/1k/elsewhere.bin"]
    [here] = [r for r in origin.stats.snapshot().requests if r["path"] == "/goto"]
    assert here["headers"].get("cookie") == "session=abc"
    assert "cookie" not in there["headers"], there["headers"]
    assert (run.store / run.manifest[0]["path"]).read_bytes() == content_bytes("elsewhere.bin", 1024)
