"""``fetcher LIST [scrapy crawl options]``: the fetch spider from any directory.

``scrapy crawl fetch`` needs the fetch project's settings, which a ``scrapy.cfg``
finds only inside this repository; the console command names them itself
(SCRAPY_SETTINGS_MODULE=fetcher.settings), so an installed fetcher works anywhere.
"""

from __future__ import annotations

import os
import sys

USAGE = """usage: fetcher LIST [scrapy crawl options]
       fetcher -a urls="URL URL ..." [scrapy crawl options]

Downloads every URL of LIST (a file, "-" for standard input, an http(s) URL, package:NAME
or a redis:// queue) into FILES_STORE (default: ./downloads). The same as
`scrapy crawl fetch -a list=LIST` inside the fetcher project. Options: -s NAME=VALUE
(a setting), -a NAME=VALUE, -L LEVEL, --logfile FILE, -O FILE (the records as a feed).
Exit status: 0 when every URL ended downloaded or up to date, 1 otherwise, 2 for bad usage."""

#: How the records and the summary tell a user of this command to rerun failed.txt.
INVOKED_AS = "fetcher"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        sys.exit(0 if args else 2)
    if args[0] == "-" or not args[0].startswith("-"):  # a list ("-": standard input), then crawl's options
        args = ["-a", f"list={args[0]}", *args[1:]]
    os.environ["SCRAPY_SETTINGS_MODULE"] = "fetcher.settings"
    os.environ.pop("SCRAPY_PROJECT", None)
    from scrapy.cmdline import execute  # noqa: PLC0415 - after the environment names the settings

    execute(["scrapy", "crawl", "fetch", "-s", f"FETCHER_INVOKED_AS={INVOKED_AS}", *args])
