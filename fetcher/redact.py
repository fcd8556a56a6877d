"""The one formatter for URLs and hosts in anything a person or a file can see:
logs, records, the manifest, the summary, failed.txt's comments, error messages.

A URL's user:password (``http://alice:s3cret@host/x``) and the values of
``Authorization``/``Proxy-Authorization`` headers are credentials: they are
shown as ``***``. Only failed.txt's entries keep URLs and headers as given, so
that a rerun of it still works.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

HIDDEN = "***"
_URL_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s]+")
_SECRET_OPTION = re.compile(r"(?i)(header\s*=\s*(?:authorization|proxy-authorization|cookie)\s*:).*")


def safe_url(url: str) -> str:
    """*url* with any user:password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=f"{HIDDEN}@{parts.netloc.rpartition('@')[2]}"))


def host_of(url: str) -> str:
    """``host[:port]`` of *url*, lowercased, never with the credentials a URL may carry."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(no host)"
    return (parts.hostname or "(no host)") + (f":{port}" if port else "")


def safe_text(text: str, *urls: str) -> str:
    """*text* (an error message, a log line) with the credentials of *urls* hidden."""
    for url in urls:
        try:
            parts = urlsplit(url)
        except ValueError:
            continue
        userinfo = parts.netloc.rpartition("@")[0]
        if userinfo:
            text = text.replace(url, safe_url(url)).replace(userinfo + "@", HIDDEN + "@")
    return text


def safe_line(text: str) -> str:
    """A list line for messages (a bad line's report): URL credentials and the
    values of ``header=Authorization:``-like options hidden."""
    return _SECRET_OPTION.sub(rf"\1 {HIDDEN}", _URL_TOKEN.sub(lambda m: safe_url(m.group()), text))
