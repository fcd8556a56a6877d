"""fetcher's exceptions: a run that cannot start, and why a streamed request failed."""

from __future__ import annotations

from scrapy.exceptions import (
    CannotResolveHostError,
    DownloadConnectionRefusedError,
    DownloadFailedError,
    DownloadTimeoutError,
    ResponseDataLossError,
)


class StartupError(Exception):
    """A component cannot work (a missing library, an unreachable store, bad
    settings): the run stops before reading its list, with this message and a
    non-zero exit status, instead of running as a silent no-op."""


# The errors of streamed requests: Scrapy's own classes (so RETRY_EXCEPTIONS still
# names them), each with the short reason the summary groups failures by.


class DNSLookupFailed(CannotResolveHostError):
    reason = "DNS lookup failed"


class ConnectionRefused(DownloadConnectionRefusedError):
    reason = "connection refused"


class Timeout(DownloadTimeoutError):
    """No connection or no response headers within DOWNLOAD_TIMEOUT, or over FETCHER_MAX_TIME."""

    reason = "timeout"


class StallTimeoutError(Timeout):
    """No body bytes arrived for FETCHER_STALL_TIMEOUT seconds."""

    reason = "stall timeout"


class ConnectionFailed(DownloadFailedError):
    reason = "connection failed"


class ConnectionLost(ResponseDataLossError):
    """The connection ended before the body did."""

    reason = "connection lost mid-body"


class TLSError(Exception):
    """The TLS handshake failed (a certificate that does not verify): retrying cannot help."""

    reason = "TLS error"


class HeadersTooLarge(Exception):
    """The response's status line and headers passed FETCHER_MAX_HEADER_SIZE: the connection
    was aborted there, and the file is given up (not in RETRY_EXCEPTIONS, no ``retryable``):
    a server that sends that much will send it again."""

    reason = "headers too large"

    @classmethod
    def over(cls, limit: int) -> HeadersTooLarge:
        return cls(f"response headers over {_size_text(limit)} (FETCHER_MAX_HEADER_SIZE)")


def _size_text(n: int) -> str:
    """A size as a person writes it: "256 KiB", "1 MiB"; "100,000 bytes" when not a whole unit."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n:,} bytes"
