"""fetcher's own signal, connected like Scrapy's (``crawler.signals.connect``)."""

#: Sent once per URL of the list when it ends, whatever the outcome, with
#: ``record`` (a :class:`fetcher.items.FileRecord`). The manifest, the summary,
#: the failed list and the progress display all listen to it.
file_finished = object()
