"""One run, N worker processes: how many (plan), how they talk to the run (channel), and the
run's side of them (crew). The worker's own side is fetcher.extensions.WorkerReport."""
