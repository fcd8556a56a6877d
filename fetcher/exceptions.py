"""fetcher's own exceptions that are not about one download."""


class StartupError(Exception):
    """A component cannot work (a missing library, an unreachable store, bad
    settings): the run stops before reading its list, with this message and a
    non-zero exit status, instead of running as a silent no-op."""
