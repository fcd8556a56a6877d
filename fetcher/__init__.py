"""fetcher: a bulk file downloader built on Scrapy.

In another Scrapy project, ``ADDONS = {"fetcher.Addon": 0}`` enables it, and a
FilesPipeline subclass streams its files when it imports its base class from
here (``from fetcher import FilesPipeline``). Both are imported on first use, so
that fetcher's pure modules (list, names, writer, backoff) load without Scrapy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Addon", "FilesPipeline"]


def __getattr__(name: str) -> Any:
    if name == "Addon":
        from fetcher.addon import Addon  # noqa: PLC0415

        return Addon
    if name == "FilesPipeline":
        from fetcher.pipelines import StreamingFilesPipeline  # noqa: PLC0415

        return StreamingFilesPipeline
    raise AttributeError(f"module 'fetcher' has no attribute {name!r}")
