"""Guards for the Scrapy internals fetcher leans on (fetcher/_scrapy_private.py).

If one of these fails after a Scrapy upgrade, the upgrade moved or changed an
internal: fix _scrapy_private.py before widening the pinned range in pyproject.
"""

from __future__ import annotations

from importlib.metadata import version

from scrapy.utils.test import get_crawler
from twisted.web.iweb import IPolicyForHTTPS

from fetcher import _scrapy_private, settings


def test_tls_policy_is_built_from_scrapy_settings() -> None:
    verified = _scrapy_private.tls_policy(get_crawler(settings_dict={"DOWNLOAD_VERIFY_CERTIFICATES": True}))
    unverified = _scrapy_private.tls_policy(get_crawler(settings_dict={"DOWNLOAD_VERIFY_CERTIFICATES": False}))
    assert IPolicyForHTTPS.providedBy(verified) and IPolicyForHTTPS.providedBy(unverified)
    # What the setting does on the wire is checked end to end in test_faults.py (TLS tests).


def test_installed_scrapy_is_in_the_tested_range() -> None:
    major, minor = (int(x) for x in version("scrapy").split(".")[:2])
    assert (2, 18) <= (major, minor) <= (2, 19), "fetcher was tested with Scrapy 2.18-2.19: rerun, then widen the pin"


def test_fetcher_settings_module_keeps_scrapy_names() -> None:
    # Settings that Scrapy reads under these exact names; a rename upstream would silently drop them.
    from scrapy.settings import default_settings

    for name in ("DOWNLOAD_VERIFY_CERTIFICATES", "TELNETCONSOLE_ENABLED"):  # REMOTE_CONTROL_ENABLED: 2.19+
        assert hasattr(default_settings, name), name
        assert hasattr(settings, name), name
