"""fetcher's stats collector: Scrapy's in-memory one, without Scrapy 2.19's hook on every attribute.

Scrapy 2.19's ``StatsCollector`` sends every attribute access (``inc_value`` reading its
own ``self._stats`` included) through a ``__getattribute__`` that looks for a cached
wrapper of the public methods, there to warn when a caller passes their deprecated
``spider`` argument. That is about 1.6 µs a call against 0.1 µs without it; a small file
makes about 30 calls (Scrapy's downloader and core stats, fetcher's counts), 3% of its CPU
(issue 18, bench/README.md). Nothing else changes: the methods, their arguments and what
they keep are Scrapy's; a caller that still passes ``spider`` is served, without the warning.

The add-on makes it the default where the project left ``STATS_CLASS`` as Scrapy's.
"""

from __future__ import annotations

from scrapy.statscollectors import MemoryStatsCollector as ScrapyMemoryStatsCollector


class MemoryStatsCollector(ScrapyMemoryStatsCollector):
    """Scrapy's MemoryStatsCollector with Python's own attribute look-up."""

    __getattribute__ = object.__getattribute__
