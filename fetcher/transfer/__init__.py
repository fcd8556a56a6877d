"""A file's transfer: its attempts, split downloads, retries and backoff, bandwidth and concurrency limits, reading a body."""
