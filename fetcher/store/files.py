"""The one way fetcher opens the files it keeps in a store: never through a symbolic link.

Every file fetcher writes, appends or reads back in a store (a body's ``.part``,
``.part.meta`` and ``.part.segments``, a finished file it hashes, the manifest,
failed.txt, the lock files, the index) is opened here with ``O_NOFOLLOW``: a link
planted at one of those names fails the open (``ELOOP``) instead of carrying the
bytes wherever it points. Folders below the store's root are checked by
``naming.resolve_in_store``; the root itself may be a link (a big disk mounted
elsewhere). The store's own records are private to the user: their folder is
made 0700 and their files 0600.

No Scrapy here.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import IO, Any

#: Mode of the files that hold the records (URLs with credentials, header= values).
PRIVATE = 0o600
PRIVATE_DIR = 0o700

_MODES = {  # open()-style modes and the os.open flags they mean
    "rb": os.O_RDONLY,
    "r": os.O_RDONLY,
    "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "r+b": os.O_RDWR,
    "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
}


def open_fd(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that never follows a symbolic link at *path* (ELOOP, with a message that says so)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "it is a symbolic link, and fetcher never writes or reads through one",
                          str(path)) from None
        raise


def open_file(path: Path, how: str, mode: int = 0o644, **kwargs: Any) -> IO[Any]:
    """Like ``path.open(how)`` (``rb``, ``r``, ``wb``, ``w``, ``r+b``, ``ab``), but never through a link."""
    fd = open_fd(path, _MODES[how], mode)
    try:
        return os.fdopen(fd, how, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace *path* with *data* in one step (a temporary name beside it, then a rename)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def private_folder(path: Path) -> None:
    """Make *path* (and its missing parents) a folder only its owner can enter; refuse a link."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, "it is a symbolic link, and fetcher keeps its records in a real folder", str(path))
    if stat.S_IMODE(st.st_mode) != PRIVATE_DIR:
        os.chmod(path, PRIVATE_DIR)


def private_file(path: Path) -> None:
    """Create *path* if missing, mode 0600 (its existing mode narrowed to it); refuse a link.
    For files another library opens by name (SQLite's index, its -wal and -shm)."""
    os.close(open_fd(path, os.O_RDONLY | os.O_CREAT, PRIVATE))
    if stat.S_IMODE(os.lstat(path).st_mode) & 0o077:
        os.chmod(path, PRIVATE)


def no_link(path: Path) -> None:
    """Raise (ELOOP) when *path* is a symbolic link; a missing path is fine."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise OSError(errno.ELOOP, "it is a symbolic link, and fetcher never writes through one", str(path))
    except FileNotFoundError:
        pass
