"""Only for ``scrapyd-deploy``, which builds its egg with ``python setup.py bdist_egg``
and writes a setup.py of its own (and leaves it behind) when there is none.
Everything else about the package is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fetcher*"]),
    entry_points={"scrapy": ["settings = fetcher.settings"]},
)
