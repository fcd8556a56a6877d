"""The shared queue on Redis, and the fetch spider's worker on it."""
