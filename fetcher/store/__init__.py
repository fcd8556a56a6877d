"""The store: file names, the hashing writer, the records, the targets (local, S3, GCS, FTP), and whether a file is up to date."""
