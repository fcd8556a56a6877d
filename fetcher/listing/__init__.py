"""URL lists: aria2's list format, and where a list comes from (file, standard input, URL, package)."""
