"""fetcher/redact.py on its own: what redact() hides and keeps, that it is
idempotent and linear (5 MiB lines of the shapes that made the old regexes
quadratic), and fetcher.logs' redacted log records on a real logger."""

from __future__ import annotations

import io
import logging
import random
import time
from collections.abc import Callable, Iterator

import pytest

from fetcher.logs import redact_log_records
from fetcher.redact import host_of, redact, safe_line, safe_text, safe_url

# (text, redact(text))
HIDDEN_CASES = [
    # userinfo
    ("http://alice:s3cret@host/x", "http://***@host/x"),
    ("http://alice:s3cret@host:81/x?y=1", "http://***@host:81/x?y=1"),
    ("http://alice@host/x", "http://***@host/x"),  # a user without password: hidden too
    ("ftp://u:p@h/", "ftp://***@h/"),
    ("ftp://mirror:pw@127.0.0.1:2121/folder", "ftp://***@127.0.0.1:2121/folder"),
    ("redis://:p%40ss%23word@10.0.0.5:7000/3?queue=big", "redis://***@10.0.0.5:7000/3?queue=big"),
    ("https://u:a@b@host/x", "https://***@host/x"),  # the last "@" ends the userinfo
    # passwords with an unencoded "/", "?", "#" or space (urlsplit sees no userinfo there)
    ("http://kim:pa/ss@host/x", "http://***@host/x"),
    ("http://kim:pa#ss@host/x", "http://***@host/x"),
    ("http://kim:pa?ss@host/x", "http://***@host/x"),
    ("http://kim:pa/s#s?x@host:81/x?q=1", "http://***@host:81/x?q=1"),
    ("ftp://user:pa ss@host/ and more", "ftp://***@host/ and more"),
    # IPv6
    ("http://u:secret@[::1]:8080/x", "http://***@[::1]:8080/x"),
    ("http://u:secret@[::1/x", "http://***@[::1/x"),  # a bad literal: urlsplit raises
    ("http://u:secret@[::1]]/x", "http://***@[::1]]/x"),
    # unsure whether the "@" ends a userinfo ("81/a" may be a password): hidden
    ("http://h:81/a@b", "http://***@b"),
    ("http://[::1]:80/a@b", "http://***@b"),
    # in text: log lines, reprs, several URLs, URLs inside URLs
    ("Crawled (200) <GET http://u:p@h/x> (referer: None)", "Crawled (200) <GET http://***@h/x> (referer: None)"),
    ("Failed http://alice:s3cret@127.0.0.1:9/x.bin: connection refused by 127.0.0.1:9",
     "Failed http://***@127.0.0.1:9/x.bin: connection refused by 127.0.0.1:9"),
    ("['http://a:1@h/x', 'https://b:2@h/y']", "['http://***@h/x', 'https://***@h/y']"),
    ("http://proxy/?u=http://alice:pw@host/", "http://proxy/?u=http://***@host/"),
    ("first http://a:b@h\nsecond http://c:d@h\n", "first http://***@h\nsecond http://***@h\n"),
    ("token://u:p@h/", "token://***@h/"),
    # header values
    ("  header=authorization: Bearer abc", "  header=authorization: ***"),
    ("  header=Authorization: Bearer x y", "  header=Authorization: ***"),
    ("  header = Proxy-Authorization : Basic eHk=", "  header = Proxy-Authorization : ***"),
    ("  header=Cookie: a=1; b=2", "  header=Cookie: ***"),
    ("http://h/x header=Authorization:t0ken", "http://h/x header=Authorization:***"),
    ("Authorization: Basic abc\r\nAccept: */*\r\nCookie: a=b; c=d\r\n",
     "Authorization: ***\r\nAccept: */*\r\nCookie: ***\r\n"),
    ("Set-Cookie: sid=1; HttpOnly\nX-Api-Key: k\nX-Auth-Token: t",
     "Set-Cookie: ***\nX-Api-Key: ***\nX-Auth-Token: ***"),
    ("Telnet Password: 6c9d4d0f", "Telnet Password: ***"),
    # failed.txt-like lines
    ("http://u:p@h/a.iso\tsha256=ab12 header=Cookie:x=1", "http://***@h/a.iso\tsha256=ab12 header=Cookie:***"),
    ("# line 3: bad checksum: http://kim:pa/ss@h/x sha256=zz", "# line 3: bad checksum: http://***@h/x sha256=zz"),
    # dict reprs and NAME=value words: Scrapy's "Overridden settings"
    ("Overridden settings:\n{'AWS_ACCESS_KEY_ID': 'AKIA1', 'AWS_SECRET_ACCESS_KEY': 'sEcReT', 'BOT_NAME': 'fetcher',"
     " 'AWS_SESSION_TOKEN': \"it's\", 'FILES_STORE': 'ftp://user:pass@host/', 'LOG_LEVEL': 'INFO'}",
     "Overridden settings:\n{'AWS_ACCESS_KEY_ID': '***', 'AWS_SECRET_ACCESS_KEY': '***', 'BOT_NAME': 'fetcher',"
     " 'AWS_SESSION_TOKEN': \"***\", 'FILES_STORE': 'ftp://***@host/', 'LOG_LEVEL': 'INFO'}"),
    ("{'FTP_PASSWORD': 'guest', 'MAIL_PASS': 'm', 'FTP_PASSIVE_MODE': 'x', 'COOKIES_ENABLED': False}",
     "{'FTP_PASSWORD': '***', 'MAIL_PASS': '***', 'FTP_PASSIVE_MODE': 'x', 'COOKIES_ENABLED': False}"),
    ('{"token": "abc", "user": "kim", "password": "hunter2"}', '{"token": "***", "user": "kim", "password": "***"}'),
    ("{b'Set-Cookie': [b'a=1', b'b=2'], b'Accept': [b'*/*']}",
     "{b'Set-Cookie': [b'***', b'***'], b'Accept': [b'*/*']}"),
    ("{'DEFAULT_REQUEST_HEADERS': {'Authorization': 'Basic eHk=', 'Accept': '*/*'}}",
     "{'DEFAULT_REQUEST_HEADERS': {'Authorization': '***', 'Accept': '*/*'}}"),
    ("headers=(('Authorization', 'Bearer x'), ('Accept', '*/*'))",
     "headers=(('Authorization', '***'), ('Accept', '*/*'))"),
    ("scrapy crawl fetch -s AWS_SECRET_ACCESS_KEY=abc -s LOG_LEVEL=DEBUG --password=x",
     "scrapy crawl fetch -s AWS_SECRET_ACCESS_KEY=*** -s LOG_LEVEL=DEBUG --password=***"),
    ("AWS_SESSION_TOKEN='a b c' next", "AWS_SESSION_TOKEN=*** next"),
]

# texts without a secret: redact() gives them back as they are
KEPT = [
    "",
    "plain text, no URL at all: 100% done",
    "http://host/a@b",  # an "@" in the path is not userinfo
    "http://host/x?to=a@b.com&t=10:30",  # nor in the query
    "http://host?to=a@b",
    "http://host#a@b",
    "http://[::1]/a@b",
    "http://[::1]:8080/x",
    "http://127.0.0.1:8765/gen/64k/one.bin",
    "<GET http://127.0.0.1:8765/x> (referer: None) from a@b",
    "http://h:81/x http://m/a@b",  # the "@" is another URL's path
    "http://h:81/x\nmail a@b",
    "http://@host/x",  # an empty userinfo hides nothing
    "http://kim:pa/x",  # no "@": no userinfo
    "mailto:john@example.com",
    "git@github.com:org/repo.git",
    "user@host:22 and alice@example.com",
    "  header=Accept: */*",
    "  header=Authorization:",
    "{'BOT_NAME': 'fetcher', 'COOKIES_DEBUG': True, 'AWS_SESSION_TOKEN': None, 'FTP_PASSIVE_MODE': 'x'}",
    "{'AWS_SECRET_ACCESS_KEY': ''}",
    "http://h/x?access_token=abc&key=1",  # a query's NAME= is not a word of its own
    "queue key: fetcher:queue:big",
    "line 1: unknown option 'tokn'; ignored (did you mean 'token'?)",
    "a:// a:// b@c",
    "http://h:/x y@z",
    "::// :@ @: [::1] ] [ ://@",
]


@pytest.mark.parametrize(("text", "shown"), HIDDEN_CASES)
def test_redact_hides(text: str, shown: str) -> None:
    assert redact(text) == shown
    assert redact(shown) == shown  # redacting twice is redacting once
    assert safe_line(text) == shown


@pytest.mark.parametrize("text", KEPT)
def test_redact_keeps_text_without_secrets(text: str) -> None:
    assert redact(text) == text
    assert safe_line(text) == text


def test_safe_url() -> None:
    assert safe_url("http://alice:s3cret@host:81/x?y=1") == "http://***@host:81/x?y=1"
    assert safe_url("http://alice@host/x") == "http://***@host/x"
    assert safe_url("http://host/a@b") == "http://host/a@b"
    assert safe_url("http://kim:pa/ss@host/x") == "http://***@host/x"
    assert safe_url("http://kim:pa#ss@host/x") == "http://***@host/x"
    assert safe_url("http://u:secret@[::1/x") == "http://***@[::1/x"
    assert safe_url("//u:p@h/x") == "//***@h/x"
    # one URL, spaces and all: FILES_STORE=ftp://user:12 34@host/ is one
    assert safe_url("ftp://user:12 34@host/") == "ftp://***@host/"
    assert safe_url("http://h x@y") == "http://h x@y"
    # a bad list line as a whole (Entry.url when the URL itself is bad)
    assert safe_url("http://h:bad/x header=Authorization: Bearer t0ken") == "http://h:bad/x header=Authorization: ***"
    assert safe_url("  header=Cookie: sid=1") == "  header=Cookie: ***"
    for url in ("", "not a url", "mailto:a@b", "http://[::1]:80/x", "http://host/x?q=a@b#f"):
        assert safe_url(url) == url


def test_host_of() -> None:
    assert host_of("https://alice:s3cret@Host.Example:8443/x") == "host.example:8443"
    assert host_of("http://u:p@[::1]:81/x") == "::1:81"
    assert host_of("http://u:secret@[::1/x") == "(no host)"
    assert host_of("http://kim:pa/ss@host/x") == "(no host)"  # "pa" is no port
    assert host_of("not a url") == "(no host)"


def test_safe_text_hides_a_userinfo_without_its_url() -> None:
    url = "http://alice:s3cret@127.0.0.1:9/x"
    text = f"connection to alice:s3cret@127.0.0.1:9 failed for {url}"
    assert safe_text(text, url) == "connection to ***@127.0.0.1:9 failed for http://***@127.0.0.1:9/x"
    assert safe_text("to kim:pa/ss@h: refused", "http://kim:pa/ss@h/x") == "to ***@h: refused"
    assert safe_text("GET http://h/x Cookie: a=1", "http://h/x") == "GET http://h/x Cookie: ***"
    assert safe_text("nothing secret", "http://h/x", "") == "nothing secret"


def _random_texts(count: int) -> list[str]:
    """Texts made of the pieces that matter to the redactor, in any order."""
    rnd = random.Random(20240607)
    pieces = ["http://", "ftp://", "://", "@", ":", "/", "?", "#", "[", "]", "::1", " ", "\n", "\t", "'", '"', "b'",
              ":81", "h", "x", "=", "Authorization: ", "Cookie", "TOKEN", "KEY", "pass", "secret", ": ", "', '",
              "(", ")", ",", "***", "\\", "header=", "u:p@", "[::1]", "-", "_", "{", "}", "set-cookie:",
              "AWS_SECRET_ACCESS_KEY=", "'token': '", "('cookie', '", "mailto:", "a@b.c"]
    return ["".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 24))) for _ in range(count)]


def test_redacting_twice_is_redacting_once() -> None:
    for text in _random_texts(20_000):
        once = redact(text)
        assert redact(once) == once, text
        once = safe_url(text)
        assert safe_url(once) == once, text


def test_no_password_survives() -> None:
    """A password that starts with a marker, with the characters that make
    URL parsers stumble, in the places URLs end up."""
    rnd = random.Random(7)
    for _ in range(5_000):
        password = "ZQX" + "".join(rnd.choice("ab/#?:@[] '\"=%") for _ in range(rnd.randint(0, 6)))
        user = rnd.choice(["", "kim", "u@x"])
        host = rnd.choice(["host", "h:81", "[::1]", "[::1]:80", "1.2.3.4:9", "[::1"])
        url = f"{rnd.choice(['http', 'ftp'])}://{user}:{password}@{host}{rnd.choice(['', '/', '/x?y=1', '/a@b'])}"
        text = rnd.choice(["{}", "<GET {}>", "'{}'", "x {} y", "{} z@q", "Failed {}: boom", '"{}"']).format(url)
        assert "ZQX" not in redact(text), text
        assert "ZQX" not in safe_url(url), url


MiB = 1 << 20


def _line(shape: str, size: int = 5 * MiB) -> str:
    rnd = random.Random(shape)
    shapes: dict[str, Callable[[], str]] = {
        "one long URL token": lambda: "http://" + "a" * size,
        "one long userinfo": lambda: "http://u:" + "p" * size + "@host/x",
        "a long word": lambda: "a" * size,
        "a long word before ://": lambda: "a" * size + "://",
        "many a:// fragments": lambda: "a://" * (size // 4),
        "many a:// words": lambda: "a:// " * (size // 5),
        "a run of @": lambda: "http://" + "@" * size,
        "a run of :": lambda: "http://" + ":" * size,
        "a run of =": lambda: "=" * size,
        "runs of :@/": lambda: "http://" + ":@/" * (size // 3),
        "header= repeats": lambda: "header=Authorization:" * (size // 21),
        "header= lines": lambda: "  header=Authorization: Bearer x\n" * (size // 32),
        "random bytes": lambda: rnd.randbytes(size).decode("latin-1"),
        "random URL characters": lambda: "".join(rnd.choices("a:/@=[]#?' \"\n", k=size)),
        "URLs with ports": lambda: "h://a:81/x " * (size // 11),
        "nested plain URLs": lambda: "http://h/" * (size // 9) + "x@y",
        "unclosed quote": lambda: "'AWS_SECRET_ACCESS_KEY': '" + "a" * size,
        "secret words": lambda: "tokenKEYpass_secret" * (size // 19),
        "settings repr": lambda: "{" + "'AWS_SECRET_ACCESS_KEY': 'x', " * (size // 31) + "}",
        "credentialed URLs": lambda: "http://u:p@h/x " * (size // 15),
    }
    return shapes[shape]()


@pytest.mark.parametrize("shape", [
    "one long URL token", "one long userinfo", "a long word", "a long word before ://", "many a:// fragments",
    "many a:// words", "a run of @", "a run of :", "a run of =", "runs of :@/", "header= repeats", "header= lines",
    "random bytes", "random URL characters", "URLs with ports", "nested plain URLs", "unclosed quote",
    "secret words", "settings repr", "credentialed URLs",
])
def test_5_mib_lines_take_linear_time(shape: str) -> None:
    line = _line(shape)
    for function in (redact, safe_url):
        started = time.perf_counter()
        function(line)
        elapsed = time.perf_counter() - started
        assert elapsed < 3, f"{function.__name__} took {elapsed:.2f}s"


def test_5_mib_results() -> None:
    assert redact(_line("one long userinfo")) == "http://***@host/x"
    assert redact(_line("header= lines")) == "  header=Authorization: ***\n" * (5 * MiB // 32)
    assert redact(_line("credentialed URLs")) == "http://***@h/x " * (5 * MiB // 15)
    line = _line("one long URL token")
    assert redact(line) == line


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("tests.test_redactor")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    factory = logging.getLogRecordFactory()
    redact_log_records()  # what the add-on does: every record of the process is a redacted one
    try:
        yield logger, stream
    finally:
        logging.setLogRecordFactory(factory)
        logger.handlers.clear()


def test_log_records_are_redacted(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = logged
    logger.info("Failed %s: %s", "http://alice:s3cret@h/x", "connection refused")
    logger.info("Overridden settings:\n%(settings)s",
                {"settings": {"AWS_SECRET_ACCESS_KEY": "sEcReT", "FILES_STORE": "ftp://user:pa55@host/"}})
    logger.warning("line 4: %s", "  header=Authorization: Bearer t0ken")
    logger.info("%d%% done at %s", 100, "http://host/a@b")  # nothing to hide: shown as formatted
    logger.error("bad format %s %s", "http://u:hunter2@h/")  # the handler would print msg and args raw
    text = stream.getvalue()
    for secret in ("s3cret", "sEcReT", "pa55", "t0ken", "hunter2"):
        assert secret not in text
    assert "INFO tests.test_redactor: Failed http://***@h/x: connection refused\n" in text
    assert "'AWS_SECRET_ACCESS_KEY': '***'" in text and "'FILES_STORE': 'ftp://***@host/'" in text
    assert "WARNING tests.test_redactor: line 4:   header=Authorization: ***\n" in text
    assert "INFO tests.test_redactor: 100% done at http://host/a@b\n" in text
    assert "http://***@h/" in text


def test_log_tracebacks_are_redacted(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = logged
    try:
        raise ConnectionError("cannot reach http://alice:s3cret@127.0.0.1:9/x (Cookie: sid=42)")
    except ConnectionError:
        logger.exception("Unexpected error fetching %s", "http://kim:pa/ss@host/x")
    logger.info("after", stack_info=True)
    text = stream.getvalue()
    assert "Traceback (most recent call last)" in text
    assert "ConnectionError: cannot reach http://***@127.0.0.1:9/x (Cookie: ***" in text
    assert "Unexpected error fetching http://***@host/x" in text
    for secret in ("s3cret", "sid=42", "pa/ss"):
        assert secret not in text


def test_every_handler_sees_the_redacted_record(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = logged
    second = io.StringIO()
    other = logging.StreamHandler(second)  # a handler installed later: nothing of its own to add
    logger.addHandler(other)
    logger.info("GET %s", "http://u:p@h/x")
    assert stream.getvalue() == "INFO tests.test_redactor: GET http://***@h/x\n"
    assert second.getvalue() == "GET http://***@h/x\n"
