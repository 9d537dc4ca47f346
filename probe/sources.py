"""Inputs -> records: a folder, a CSV/TSV of ``path[,label]``, or explicit files; and their content hashes.

A record's cache key is the sha256 of its bytes. Hashing is remembered per (path, size, mtime_ns) in a small
SQLite table next to the cache, so a cache-hit run does not re-read unchanged files.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .errors import InputError
from .files import NotRegularFileError, file_kind, open_regular

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)
MEMO_FILE = "hashes.sqlite"


@dataclass(frozen=True)
class Record:
    """One input: where it is and, when the source says, its label."""

    path: str
    label: str | None = None


def is_table(path: Path) -> bool:
    return path.suffix.lower() in (".csv", ".tsv")


def from_folder(root: str | os.PathLike) -> list[Record]:
    """Every image file under ``root`` (recursive, sorted); the label is the parent folder's name for files in a
    subfolder (``root/<class>/<file>``), None for files directly in ``root``."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        label = None if here == root else here.name
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            out.append(Record(str(here / name), label))
    return out


def from_table(table: str | os.PathLike) -> list[Record]:
    """Rows of ``path[,label]`` (CSV, or TSV by extension); a header row naming ``path`` is optional; relative
    paths are relative to the table's folder."""
    table = Path(table)
    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f, delimiter=delimiter))
    except UnicodeDecodeError as e:
        raise InputError(f"{table}: not a UTF-8 text table ({e.reason})") from e
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise InputError(f"{table}: empty table")
    path_col, label_col, start = 0, (1 if len(rows[0]) > 1 else None), 0
    header = [c.strip().lower() for c in rows[0]]
    if "path" in header:
        path_col = header.index("path")
        label_col = header.index("label") if "label" in header else None
        start = 1
    out = []
    for lineno, row in enumerate(rows[start:], start=start + 1):
        if path_col >= len(row) or not row[path_col].strip():
            raise InputError(f"{table}:{lineno}: no path in row {row!r}")
        p = Path(row[path_col].strip())
        if not p.is_absolute():
            p = table.parent / p
        label = row[label_col].strip() if label_col is not None and label_col < len(row) else None
        out.append(Record(str(p), label or None))
    return out


def resolve(inputs: str | os.PathLike | Record | Iterable[str | os.PathLike | Record]) -> list[Record]:
    """Turn a folder, a CSV/TSV, a file, or a list of any of them into records (in a stable order).

    A missing input is an :class:`InputError` naming it; files named in a table that do not exist are kept as
    records (extraction reports them as failures, so nothing else in the run is lost).
    """
    if isinstance(inputs, (str, os.PathLike, Record)):
        inputs = [inputs]
    out: list[Record] = []
    for item in inputs:
        if isinstance(item, Record):  # already resolved (e.g. paths with labels from Python)
            out.append(item)
            continue
        p = Path(item)
        kind = _kind(p)
        if kind not in (None, "file", "directory"):  # a FIFO or device: reported (and skipped) when hashed
            out.append(Record(str(p)))
        elif p.is_dir():
            found = from_folder(p)
            if not found:
                raise InputError(f"{p}: folder holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            out.extend(found)
        elif p.is_file() and is_table(p):
            out.extend(from_table(p))
        elif p.is_file():
            out.append(Record(str(p)))
        else:
            raise InputError(f"{p}: no such file or folder")
    return out


def _kind(p: Path) -> str | None:
    try:
        return file_kind(os.stat(p).st_mode)
    except (OSError, ValueError):
        return None


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a regular file's bytes (a FIFO, device or folder is a NotRegularFileError, never read)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class HashMemo:
    """(absolute path, size, mtime_ns) -> sha256, in SQLite so concurrent runs can share it.

    A memo in a folder this process cannot write (a shared, read-only cache) is opened read-only: lookups work,
    new hashes are simply not remembered. :meth:`open` returns None when there is no usable memo at all.
    """

    def __init__(self, path: str | os.PathLike, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            # immutable=1: no -wal/-shm files are needed (a read-only folder cannot hold them)
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, timeout=30)
            self._db.execute("SELECT 1 FROM memo LIMIT 1")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS memo (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha256 TEXT)"
        )

    @classmethod
    def open(cls, path: str | os.PathLike, create: bool = True) -> "HashMemo | None":
        """The memo at ``path``: writable when its folder is, else read-only; None when it does not exist and
        cannot (or, with ``create=False``, may not) be created, or cannot be read."""
        path = Path(path)
        writable = os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))
        if not path.exists() and not (create and writable):
            return None
        try:
            return cls(path, readonly=not writable)
        except sqlite3.Error as e:
            log.warning("%s: hash memo not usable (%s); hashing every input", path, e)
            return None

    def lookup(self, paths: Sequence[str]) -> dict[str, tuple[int, int, str]]:
        found = {}
        for i in range(0, len(paths), 500):
            chunk = paths[i:i + 500]
            q = f"SELECT path, size, mtime_ns, sha256 FROM memo WHERE path IN ({','.join('?' * len(chunk))})"
            for path, size, mtime, digest in self._db.execute(q, chunk):
                found[path] = (size, mtime, digest)
        return found

    def store(self, rows: Iterable[tuple[str, int, int, str]]) -> None:
        if self.readonly:
            return
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO memo VALUES (?, ?, ?, ?)", rows)

    def close(self) -> None:
        self._db.close()


@dataclass
class HashResult:
    keys: list[str | None]  # None where the file could not be read
    errors: dict[int, str]  # record index -> message
    read: int = 0  # files actually read (memo misses)


def hash_files(paths: Sequence[str], memo: HashMemo | None = None) -> HashResult:
    """sha256 of each file's bytes; unchanged files (same size and mtime_ns) are answered from ``memo``."""
    abspaths = [os.path.abspath(p) for p in paths]
    known = memo.lookup(abspaths) if memo is not None else {}
    keys: list[str | None] = [None] * len(paths)
    errors: dict[int, str] = {}
    fresh = []
    read = 0
    for i, ap in enumerate(abspaths):
        try:
            st = os.stat(ap)
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
            errors[i] = f"{paths[i]}: cannot read ({getattr(e, 'strerror', None) or e})"
            continue
        if not stat.S_ISREG(st.st_mode):
            errors[i] = f"{paths[i]}: not a regular file ({file_kind(st.st_mode)}); skipped"
            continue
        hit = known.get(ap)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            keys[i] = hit[2]
            continue
        try:
            keys[i] = sha256_file(ap)
        except NotRegularFileError as e:  # replaced by a FIFO or device since the stat
            errors[i] = f"{paths[i]}: {e.strerror}; skipped"
            continue
        except OSError as e:
            errors[i] = f"{paths[i]}: cannot read ({e.strerror or e})"
            continue
        read += 1
        fresh.append((ap, st.st_size, st.st_mtime_ns, keys[i]))
    if memo is not None and fresh:
        memo.store(fresh)
    return HashResult(keys, errors, read)
