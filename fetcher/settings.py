"""The fetch project's settings: Scrapy's own knobs tuned for bulk downloading,
fetcher's add-on, and the few choices of this project that differ from the
add-on's stock-compatible defaults (every ``FETCHER_*`` default is documented in
``fetcher/config.py``).

Override any of them per run (``-s CONCURRENT_REQUESTS=128``), per project, or
per Scrapyd job. ``scrapy settings --get NAME`` shows the effective value.
"""

from fetcher.store.records import MANIFEST_FIELDS

BOT_NAME = "fetcher"
SPIDER_MODULES = ["fetcher.spiders"]
NEWSPIDER_MODULE = "fetcher.spiders"
COMMANDS_MODULE = "fetcher.commands"  # `scrapy crawl` that exits non-zero when a URL failed

# --- Limits: Scrapy's own settings do them -------------------------------------
# Bulk downloading wants many parallel transfers, but a polite cap per host:
# stock 16/8 leaves bandwidth unused; the project template's 1 per domain and
# 1 s delay is for scraping pages, not for fetching files.
CONCURRENT_REQUESTS = 64
CONCURRENT_REQUESTS_PER_DOMAIN = 16
DOWNLOAD_DELAY = 0
AUTOTHROTTLE_ENABLED = False
ROBOTSTXT_OBEY = False  # the list names the files to fetch, as with wget -i or aria2c -i
# For streamed files DOWNLOAD_TIMEOUT bounds connecting plus waiting for the
# response headers; FETCHER_STALL_TIMEOUT bounds silences in the body.
DOWNLOAD_TIMEOUT = 60
RETRY_TIMES = 5  # attempts after the first (aria2c tries 5 times in all)
# RETRY_HTTP_CODES and RETRY_EXCEPTIONS keep Scrapy's defaults.
DNSCACHE_ENABLED = True
DOWNLOAD_VERIFY_CERTIFICATES = True  # a downloader must not accept any certificate
# DOWNLOAD_MAXSIZE (1 GiB) still caps responses that are not streamed;
# streamed files are capped by FETCHER_MAX_SIZE only.

# fetcher's components (handler, pipeline, redirect guard, progress, summary) and
# every FETCHER_* default come from the add-on (written once, in fetcher/config.py).
ADDONS = {"fetcher.Addon": 0}
FILES_STORE = "downloads"  # relative to the working directory, or s3://bucket/prefix (AWS_* settings)

# A feed export of the fetch spider's items (-O records.jsonl, Scrapyd's items_url) is its records:
# one flat line per URL, with the manifest's fields.
FEED_EXPORT_FIELDS = list(MANIFEST_FIELDS)

# A downloader needs no control servers (Scrapy 2.19 starts two by default).
TELNETCONSOLE_ENABLED = False
REMOTE_CONTROL_ENABLED = False
LOG_LEVEL = "INFO"
LOG_VERSIONS: list[str] = []  # no version banner at start-up (scrapy version shows it)
STATS_DUMP = False  # the summary says it in five lines; -s STATS_DUMP=True for Scrapy's full stats

# --- The fetch project's own choices (the add-on's defaults are stock FilesPipeline's) ----
FETCHER_LAYOUT = "url"  # readable names: <host>[:port]/<url path>[?query]
FETCHER_ALGORITHM = "sha256"
FETCHER_EMPTY_FILES = True  # a 0-byte file is a file, as with wget and aria2c
MEDIA_ALLOW_REDIRECTS = True  # a list's URL that redirects is downloaded from where it leads
