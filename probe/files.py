"""Files probe reads and writes, handled with suspicion. Torch-free.

* Atomic writes: write under a temporary name in the same folder, fsync, rename into place. A crash or kill never
  leaves a half-written file under the final name, and a target that exists but is not a regular file (a symlink,
  a device node, a FIFO, a folder) is refused instead of replaced: probe never replaces what is not its own.
* Reading inputs: only regular files are read. :func:`open_regular` opens without blocking and checks the kind of
  what it opened (after symlink resolution) before reading a byte, so a FIFO or ``/dev/zero`` among the inputs is
  reported instead of hanging the run, and there is no window between the check and the read.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import ProbeError


class NotRegularFileError(ProbeError, OSError):
    """A path names something other than a regular file (FIFO, device, socket, folder)."""


def file_kind(mode: int) -> str:
    """A short name of what ``st_mode`` describes: 'file', 'directory', 'fifo', 'device', 'socket', 'symlink'."""
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "special file"


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for binary reading if (after following symlinks) it is a regular file.

    Raises :class:`NotRegularFileError` naming the kind ("fifo", "device", "directory", ...) otherwise, and
    OSError for a missing or unreadable file. Opening never blocks: a FIFO is opened non-blocking, seen to be a
    FIFO and closed without reading.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(errno.EINVAL, f"not a regular file ({file_kind(st.st_mode)})", os.fspath(path))
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems refuse a directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_target(path: str | os.PathLike) -> Path:
    """Refuse to write over anything but a regular file: a symlink, device, FIFO or folder at ``path`` is an
    error naming it (probe replaces only files it could have written itself)."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except NotADirectoryError as e:
        raise ProbeError(f"{path}: cannot write here: {path.parent} is not a folder") from e
    if not stat.S_ISREG(st.st_mode):
        raise ProbeError(f"{path}: refusing to replace a {file_kind(st.st_mode)} with an output file; "
                         "choose another path")
    return path


def ensure_folder(path: str | os.PathLike, what: str = "folder") -> Path:
    """Create ``path`` (and parents) if needed; a one-line error names it when that is impossible."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise ProbeError(f"{path}: {what} path exists and is not a folder") from e
    except NotADirectoryError as e:
        raise ProbeError(f"{path}: {what} cannot be created: a parent is a file, not a folder") from e
    except PermissionError as e:
        raise ProbeError(f"{path}: {what} cannot be created: permission denied") from e
    except OSError as e:
        raise ProbeError(f"{path}: {what} cannot be created ({e.strerror or e})") from e
    if not path.is_dir():
        raise ProbeError(f"{path}: {what} path exists and is not a folder")
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds, fsync it and rename it to ``path``.
    When the block raises, the temporary file is removed and ``path`` is untouched. A ``path`` that exists and is
    not a regular file is refused before anything is written."""
    path = check_output_target(path)
    ensure_folder(path.parent, "output folder")
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        try:
            yield tmp
        except PermissionError as e:
            raise ProbeError(f"{path}: cannot write here: permission denied") from e
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        check_output_target(path)  # something may have appeared there meanwhile
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
