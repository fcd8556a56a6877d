"""fetcher's exceptions: a run that cannot start, and why a streamed request failed."""

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
