"""pytest plugin: run Scrapy's own FilesPipeline tests against fetcher's pipeline.

Loaded with ``-p fetcher_swap`` (this folder on PYTHONPATH) by the run of Scrapy's
tests that tests/test_scrapy_suite.py starts. Before the test modules are imported
it swaps:

* ``scrapy.pipelines.files.FilesPipeline`` -> ``fetcher.FilesPipeline``
  (StreamingFilesPipeline): tests that do ``from scrapy.pipelines.files import
  FilesPipeline`` and crawls that name "scrapy.pipelines.files.FilesPipeline" in
  ITEM_PIPELINES (load_object reads the module attribute) get fetcher's class.
  fetcher.pipelines and scrapy.pipelines.images are imported first, so fetcher's
  base class, and ImagesPipeline's, stay stock's.
* the default ``http``/``https`` download handlers (DOWNLOAD_HANDLERS_BASE) ->
  ``fetcher.handlers.StreamingDownloadHandler``, which fetcher's pipeline needs to
  stream bodies to disk (requests without a sink go on to stock's handler), as
  fetcher.Addon sets it. Nothing else of the add-on (extensions, log formatter,
  redirect guard, FETCHER_* defaults at add-on priority) is enabled: the tests see
  the pipeline and its handler, not a fetch project.

It checks that the asyncio reactor is installed (fetcher's pipeline needs it; Scrapy's
pytest configuration asks pytest-twisted for it with ``--reactor=asyncio``), and after
collection that the test modules hold fetcher's class, so a swap that did not take
cannot pass for stock's results.
"""

from __future__ import annotations

import pytest

HANDLER = "fetcher.handlers.StreamingDownloadHandler"


@pytest.hookimpl(trylast=True)  # after pytest-twisted has installed the reactor
def pytest_configure(config: pytest.Config) -> None:
    from scrapy.utils.reactor import is_asyncio_reactor_installed  # noqa: PLC0415

    if not is_asyncio_reactor_installed():
        raise pytest.UsageError("fetcher_swap: fetcher's pipeline needs the asyncio reactor "
                                "(pytest-twisted with --reactor=asyncio)")
    import scrapy.pipelines.images  # noqa: F401, PLC0415 - ImagesPipeline keeps stock's base class
    from scrapy.pipelines import files  # noqa: PLC0415
    from scrapy.settings import default_settings  # noqa: PLC0415

    from fetcher.pipelines import StreamingFilesPipeline  # noqa: PLC0415

    files.FilesPipeline = StreamingFilesPipeline  # type: ignore[misc]
    default_settings.DOWNLOAD_HANDLERS_BASE = {
        **default_settings.DOWNLOAD_HANDLERS_BASE, "http": HANDLER, "https": HANDLER}


def pytest_collection_finish(session: pytest.Session) -> None:
    from fetcher.pipelines import StreamingFilesPipeline  # noqa: PLC0415

    for module in {item.module for item in session.items if getattr(item, "module", None)}:
        found = getattr(module, "FilesPipeline", StreamingFilesPipeline)
        if found is not StreamingFilesPipeline:
            raise pytest.UsageError(f"fetcher_swap: {module.__name__}.FilesPipeline is {found!r}, not fetcher's")


def pytest_report_header(config: pytest.Config) -> str:
    return f"fetcher_swap: scrapy.pipelines.files.FilesPipeline is fetcher's StreamingFilesPipeline; " \
           f"http/https handler {HANDLER}"
