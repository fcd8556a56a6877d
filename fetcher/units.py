"""Sizes as a person reads them, in messages and the summary (no Scrapy here)."""


def human_bytes(n: float) -> str:
    """``"512 B"``, ``"3.0 GiB"``: binary units, one decimal past bytes."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - unreachable, keeps type checkers calm
