"""Scrapy's own FilesPipeline tests, fetched and run against fetcher's pipeline (see tests/test_scrapy_suite.py)."""
