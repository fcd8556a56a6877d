"""How long to wait before trying a download again: exponential backoff with
jitter, or what the server asked for with ``Retry-After``."""

from __future__ import annotations

import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds from *now* (a Unix time) that a ``Retry-After`` value asks for.

    Both forms are allowed (RFC 9110 10.2.3): delay-seconds or an HTTP-date.
    Anything unparsable is ignored rather than trusted.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay policy: ``base * 2**(attempt-1)`` capped at ``cap``, with "equal
    jitter" (half fixed, half random) so that many failing downloads do not come
    back in lockstep; a server's Retry-After wins, capped at ``retry_after_cap``."""

    base: float = 1.0
    cap: float = 60.0
    retry_after_cap: float = 600.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap)
        exp = min(self.cap, self.base * 2 ** max(0, attempt - 1))
        return exp / 2 + random.uniform(0, exp / 2)  # noqa: S311 - jitter, not crypto
