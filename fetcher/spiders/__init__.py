"""fetcher's spiders: ``fetch`` downloads a URL list."""
