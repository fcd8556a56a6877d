"""fetcher's settings: Scrapy's own knobs tuned for bulk downloading, and every
``FETCHER_*`` setting with its default, documented here once.

Override any of them per run (``-s CONCURRENT_REQUESTS=128``), per project, or
per Scrapyd job. ``scrapy settings --get NAME`` shows the effective value.
"""

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

DOWNLOAD_HANDLERS = {
    "http": "fetcher.handlers.StreamingDownloadHandler",
    "https": "fetcher.handlers.StreamingDownloadHandler",
}
DOWNLOADER_MIDDLEWARES = {"fetcher.middlewares.RedirectGuardMiddleware": 650}  # before RedirectMiddleware (600)
ITEM_PIPELINES = {"fetcher.pipelines.StreamingFilesPipeline": 1}
FILES_STORE = "downloads"  # relative to the working directory, or s3://bucket/prefix (AWS_* settings)
EXTENSIONS = {
    "scrapy.extensions.logstats.LogStats": None,  # replaced by fetcher's progress lines
    "fetcher.extensions.Progress": 90,  # first: its bar is closed before the summary prints
    "fetcher.extensions.Summary": 110,
}

# A feed export of the fetch spider's items (-O records.jsonl, Scrapyd's items_url) is its records.
FEED_EXPORT_FIELDS = ["record"]

# A downloader needs no control servers (Scrapy 2.19 starts two by default).
TELNETCONSOLE_ENABLED = False
REMOTE_CONTROL_ENABLED = False
LOG_LEVEL = "INFO"
LOG_VERSIONS: list[str] = []  # no version banner at start-up (scrapy version shows it)
STATS_DUMP = False  # the summary says it in five lines; -s STATS_DUMP=True for Scrapy's full stats

# --- fetcher's own settings ------------------------------------------------------
FETCHER_ALGORITHM = "sha256"  # hashlib name of the digest in the manifest and `files`
FETCHER_LAYOUT = "url"  # "url": <host>[:port]/<url path>[?query]; "hash": stock FilesPipeline's full/<sha1>.<ext>
FETCHER_NAME_QUERY = True  # keep a URL's query string in its file name (False: a?x=1 and a?x=2 share one name)
# The store's records (one current record per URL, across runs) live in an SQLite
# index in the state folder; manifest.jsonl and failed.txt are written from it.
FETCHER_STATE_DIR = ""  # "": <FILES_STORE>/.fetcher, or for a remote store ~/.local/state/fetcher/<store>
FETCHER_MANIFEST = ""  # one JSON line per URL; "": manifest.jsonl in FILES_STORE (remote: in the state folder)
FETCHER_FAILED_LIST = ""  # the store's failures in list format; "": failed.txt beside the manifest
FETCHER_VERIFY = "stat"  # finished files: "stat" compares size and mtime with the record; "full" re-hashes them
FETCHER_SPOOL = ""  # remote stores: where bodies are written before upload; "": <tmp>/fetcher-spool/<store>
FETCHER_MULTIPART_THRESHOLD = 8 * 1024 * 1024  # remote stores: larger files are uploaded in parts of this size
FETCHER_MAX_SIZE = 0  # bytes; a larger file fails (0: no cap)
FETCHER_MAX_PENDING = 1000  # list entries in progress at once, at least 2 x CONCURRENT_REQUESTS (bounds memory)
FETCHER_RESUME = True  # continue a .part file with Range/If-Range instead of starting over
FETCHER_REVALIDATE = False  # ask the server (If-None-Match/If-Modified-Since) instead of skipping finished files
FETCHER_FSYNC = False  # fsync each file before renaming it into place
FETCHER_STALL_TIMEOUT = None  # seconds without body bytes before an attempt is abandoned; None: DOWNLOAD_TIMEOUT
FETCHER_MAX_TIME = 0  # seconds one attempt may take in all (0: no limit)
FETCHER_PROGRESS = "auto"  # "bar" on a terminal, "log" lines otherwise; or force "bar", "log", "off"
FETCHER_PROGRESS_INTERVAL = 60.0  # seconds between progress log lines (the "log" mode)
FETCHER_BACKOFF_BASE = 1.0  # first retry waits about this long (seconds), doubling each time
FETCHER_BACKOFF_MAX = 60.0  # cap on the exponential backoff (seconds)
FETCHER_RETRY_AFTER_MAX = 600.0  # cap on a server's Retry-After (seconds)

# --- A shared queue (scrapy enqueue REDIS_URL LIST; scrapy crawl fetch -a list=REDIS_URL) ---------
FETCHER_QUEUE_LEASE = 60.0  # seconds an entry stays a dead worker's before another takes it (live ones renew it)
FETCHER_QUEUE_IDLE = 10.0  # a worker ends after this many seconds with nothing waiting or in flight anywhere; 0: never
FETCHER_QUEUE_MAX_DELIVERIES = 5  # an entry delivered this often without an acknowledgement is dead-lettered
