"""The cache lock protocol: one advisory lock file per feature space (``fcntl.flock``). Torch-free.

* Extraction runs (writers) and readers take the lock **shared**: any number run at once. Writers never
  modify a published file, so sharing is safe.
* ``compact`` and ``rm`` take it **exclusively**: they wait until no run is using the space (saying so once), or
  fail at once with :class:`CacheBusyError` when asked not to wait. So compaction never deletes a segment a
  writer published after it looked, and never removes a file under a reader.

A space whose folder cannot be written (a read-only, shared cache) can still be locked when the lock file exists;
when it cannot even be created, readers go on without a lock: nothing can compact or remove a read-only cache.
See docs/cache-format.md ("Concurrency").
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ProbeError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class CacheBusyError(ProbeError):
    """An exclusive cache operation was asked not to wait, and another process is using the space."""


@contextmanager
def space_lock(space_dir: str | os.PathLike, *, exclusive: bool = False, wait: bool = True,
               purpose: str = "") -> Iterator[bool]:
    """Hold the lock of the space at ``space_dir`` for the block; yields whether a lock is actually held."""
    path = Path(space_dir) / LOCK_FILE
    fd = _open(path)
    if fd is None:
        yield False
        return
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            what = f" to {purpose}" if purpose else ""
            if not wait:
                raise CacheBusyError(
                    f"{space_dir}: feature space is in use by another probe process; not waiting{what} (--no-wait)"
                ) from None
            log.warning("%s: waiting for other probe processes using this feature space%s", space_dir, what)
            fcntl.flock(fd, mode)
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _open(path: Path) -> int | None:
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            return os.open(path, flags | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileNotFoundError:
            return None  # the space folder itself is gone
        except OSError:
            continue  # read-only folder: try to open an existing lock file read-only (flock works on it)
    log.debug("%s: cannot open the lock file (read-only cache); reading without a lock", path)
    return None
