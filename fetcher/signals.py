"""fetcher's own signals, connected like Scrapy's (``crawler.signals.connect``)."""

#: Sent once per URL of the list when it ends, whatever the outcome, with
#: ``record`` (a :class:`fetcher.items.FileRecord`). The manifest, the summary,
#: the failed list and the progress display all listen to it.
file_finished = object()

#: Sent once when the store's records could not be written (a full disk, a folder in the
#: manifest's place): the run's records are not complete, and it must not exit 0.
records_unwritten = object()

#: Sent when the run cannot end well for a reason outside its records, with ``reason``
#: (a worker process that could not start, or none left to finish the list), once the
#: sender has logged it.
run_failed = object()
