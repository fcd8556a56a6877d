"""Sizes as a person reads them, in messages and the summary (no Scrapy here)."""


def human_bytes(n: float) -> str:
    """``"512 B"``, ``"3.0 GiB"``: binary units, one decimal past bytes."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"
