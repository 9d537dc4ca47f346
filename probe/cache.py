"""The HDF5 feature cache: content-addressed, append-only, crash-safe. No torch import.

Layout (see docs/cache-format.md for the full spec)::

    <root>/spaces/<space-id>/space.json          the feature-space description (written once, atomically)
    <root>/spaces/<space-id>/segments/seg-*.h5   complete segments; readers only ever look at these
    <root>/spaces/<space-id>/segments/.tmp-*.h5  a segment being written; never read, removed once stale

A *feature space* is everything that changes a feature value (backbone, weights sha256, preprocess, layer,
pooling, dim, storage dtype, compute precision, format version); its sha256 names the directory. Rows are keyed
by the sha256 of the input's bytes, so a changed file is a new row and features can never be stale.

HDF5 is not crash-safe, so no file a reader depends on is ever modified: rows are buffered, written to a
temporary segment, fsync'ed and atomically renamed into place. A SIGKILL loses at most the open buffer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from .defaults import DEFAULT_CACHE
from .errors import CacheCorruptError, CacheMismatchError, ProbeError
from .files import atomic_path, atomic_write_text, ensure_folder, fsync_dir
from .locks import space_lock
from .space import FORMAT_VERSION, FeatureSpace

__all__ = ["FORMAT", "FORMAT_VERSION", "SPACE_FILE", "FeatureCache", "FeatureSpace", "FeatureStore", "SegmentWriter",
           "VerifyReport"]

log = logging.getLogger(__name__)

FORMAT = "probe.feature-segment"
SPACE_FILE = "space.json"
QUARANTINE_DIR = "quarantine"
_SEGMENT_NAME = re.compile(r"^seg-[A-Za-z0-9_.-]{1,200}\.h5$")
_SPACE_ID = re.compile(r"^[0-9a-f]{1,64}$")
_KEY_RE = re.compile(rb"^[0-9a-f]{64}$")
_BLOCK = 4096  # rows read per block when gathering features from a segment


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Segment:
    path: Path
    keys: np.ndarray  # S64
    rows: int
    problem: str | None = None  # why the segment cannot be used (damaged); None: fine or not yet checked
    verified: bool = False  # checksum, shapes and values checked by this process


@dataclass
class VerifyReport:
    space_id: str
    files: int = 0
    rows: int = 0
    unique_rows: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    damaged: list[Path] = field(default_factory=list)  # segments that failed a check (what --repair moves aside)
    quarantined: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class FeatureStore:
    """The rows of one feature space: lookup by key, ordered gather, append through :class:`SegmentWriter`.

    Reads are verified: the first time this process reads from a segment (or asks whether its rows exist,
    :meth:`ensure_verified`), the segment's features are checked against their checksum, shape and finiteness. A
    segment that fails is *damaged*: a warning names it, its rows count as missing (so a writing run re-extracts
    them) and nothing is ever served from it. Segments are immutable, so each is checked once per process.
    """

    def __init__(self, path: Path, space: FeatureSpace, scan: bool = True):
        self.path = Path(path)
        self.space = space
        self.segments_dir = self.path / "segments"
        self._segments: list[Segment] = []
        self._index: dict[bytes, tuple[int, int]] = {}
        self._handles: dict[int, h5py.File] = {}
        self._seen: set[str] = set()
        self._locked = 0  # depth of this store's own lock (so its reads do not lock again under compact)
        if scan:  # scan=False: no index (and no error on a damaged segment), for verify() to report on it
            self.refresh()

    # -- reading -----------------------------------------------------------------------------------------

    def segment_files(self) -> list[Path]:
        return sorted(p for p in self.segments_dir.glob("seg-*.h5") if p.is_file() and not p.is_symlink())

    @property
    def damaged(self) -> list[Segment]:
        return [s for s in self._segments if s.problem is not None]

    def refresh(self) -> None:
        """Pick up segments written since the last scan (by this or another process). A segment of another
        feature space or format version is refused (CacheMismatchError); an unreadable one is damaged."""
        for p in self.segment_files():
            if p.name in self._seen:
                continue
            self._seen.add(p.name)
            try:
                with h5py.File(p, "r") as f:
                    self._check_segment_attrs(f, p)
                    keys = f["keys"][...]
                    if keys.dtype != np.dtype("S64") or keys.ndim != 1:
                        raise CacheCorruptError(f"{p.name}: keys dataset is {keys.dtype} {keys.shape}, not S64 (rows,)")
            except CacheMismatchError:
                self._seen.discard(p.name)
                raise
            except (OSError, KeyError, ValueError, CacheCorruptError) as e:
                self._damage(Segment(p, np.empty(0, "S64"), 0), f"unreadable ({_one_line(e)})")
                continue
            i = len(self._segments)
            self._segments.append(Segment(p, keys, len(keys)))
            for row, k in enumerate(keys.tolist()):
                self._index.setdefault(k, (i, row))

    def _check_segment_attrs(self, f: h5py.File, p: Path) -> None:
        fmt = f.attrs.get("format")
        if fmt != FORMAT:
            raise CacheCorruptError(f"{p}: format={fmt!r}, expected {FORMAT!r}")
        try:
            version = int(f.attrs.get("format_version", -1))
        except (TypeError, ValueError):
            version = -1
        if version != FORMAT_VERSION:
            raise CacheMismatchError("format_version", FORMAT_VERSION, version, str(p))
        digest = f.attrs.get("space_digest")
        if digest != self.space.digest:
            try:
                found = FeatureSpace.from_dict(json.loads(f.attrs["space"]))
            except (KeyError, ValueError, TypeError, CacheCorruptError) as e:
                raise CacheCorruptError(f"{p}: unreadable space attribute ({_one_line(e)})") from e
            name = self.space.first_difference(found) or "space_digest"
            raise CacheMismatchError(name, getattr(self.space, name, digest), getattr(found, name, digest), str(p))

    def _damage(self, seg: Segment, problem: str) -> None:
        """Mark a segment damaged, warn once, and stop serving its rows (re-pointing keys to good duplicates)."""
        seg.problem = problem
        if seg not in self._segments:
            self._segments.append(seg)
        rows = f"its {seg.rows} rows are" if seg.rows else "its rows are"
        log.warning("%s: damaged cache segment (%s); %s treated as missing and will be extracted again; "
                    "`probe cache verify --repair` moves it aside", seg.path, problem, rows)
        self._rebuild_index()

    def _rebuild_index(self) -> None:
        self._index = {}
        for i, seg in enumerate(self._segments):
            if seg.problem is None:
                for row, k in enumerate(seg.keys.tolist()):
                    self._index.setdefault(k, (i, row))

    def check_segment(self, i: int) -> str | None:
        """Verify segment ``i`` (once per process): shapes, dtype, key syntax, finite values and the checksums.
        Returns the problem found, or None."""
        seg = self._segments[i]
        if seg.verified or seg.problem is not None:
            return seg.problem
        try:
            problem = _check_segment_file(self._handle(i), self.space, seg.keys)
        except (OSError, KeyError, ValueError) as e:
            problem = f"unreadable ({_one_line(e)})"
        seg.verified = problem is None
        if problem is not None:
            self.close_segment(i)
            self._damage(seg, problem)
        return problem

    def ensure_verified(self, keys: Iterable[str | bytes] | None = None) -> None:
        """Verify every segment that serves one of ``keys`` (all segments when None), so that afterwards
        membership and reads only ever involve verified rows."""
        while True:
            if keys is None:
                todo = {i for i, s in enumerate(self._segments) if not s.verified and s.problem is None}
            else:
                wanted = [k.encode() if isinstance(k, str) else k for k in keys]
                keys = wanted
                todo = {loc[0] for k in wanted if (loc := self._index.get(k)) is not None}
                todo = {i for i in todo if not self._segments[i].verified}
            if not todo:
                return
            for i in sorted(todo):
                self.check_segment(i)  # a damaged one re-points its keys: loop until all served rows are verified

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key.encode() in self._index

    def keys(self) -> list[str]:
        return [k.decode() for k in self._index]

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys (in input order, without repeats) that have no verified row."""
        keys = list(keys)
        self.ensure_verified(keys)
        out, seen = [], set()
        for k in keys:
            if k not in seen and k.encode() not in self._index:
                seen.add(k)
                out.append(k)
        return out

    def _handle(self, i: int) -> h5py.File:
        h = self._handles.get(i)
        if h is None:
            h = self._handles[i] = h5py.File(self._segments[i].path, "r")
        return h

    def close_segment(self, i: int) -> None:
        h = self._handles.pop(i, None)
        if h is not None:
            h.close()

    def get(self, keys: Sequence[str], out: np.ndarray | None = None) -> np.ndarray:
        """Verified features for ``keys`` in the requested order as float32 (n, dim).

        Only the requested rows are read: rows are grouped by segment and gathered block by block, so memory
        stays at the output plus one block, however large the cache is. Holds the space's shared lock while
        reading; a segment that vanished meanwhile (compacted away by another process) makes the store re-list
        once and retry.
        """
        with self.lock():
            try:
                return self._get(keys, out)
            except FileNotFoundError:
                log.info("%s: a segment vanished (compacted by another process); re-listing", self.path)
                self.reset()
                return self._get(keys, out)

    def _get(self, keys: Sequence[str], out: np.ndarray | None) -> np.ndarray:
        n = len(keys)
        if out is None:
            out = np.empty((n, self.space.dim), dtype=np.float32)
        self.ensure_verified(keys)
        by_segment: dict[int, list[tuple[int, int]]] = {}
        for pos, k in enumerate(keys):
            loc = self._index.get(k.encode() if isinstance(k, str) else k)
            if loc is None:
                raise KeyError(f"key {k} is not in feature space {self.space.id}")
            by_segment.setdefault(loc[0], []).append((loc[1], pos))
        for seg, pairs in by_segment.items():
            ds = self._handle(seg)["features"]
            pairs.sort()
            rows = np.fromiter((r for r, _ in pairs), dtype=np.int64, count=len(pairs))
            positions = np.fromiter((p for _, p in pairs), dtype=np.int64, count=len(pairs))
            block_of = rows // _BLOCK
            bounds = np.flatnonzero(np.diff(block_of)) + 1
            for idx in np.split(np.arange(len(rows)), bounds):
                r = rows[idx]
                lo, hi = int(r[0]), int(r[-1]) + 1
                if len(r) * 8 >= hi - lo:  # dense enough: one contiguous read beats a scattered selection
                    out[positions[idx]] = ds[lo:hi][r - lo]
                else:
                    uniq, inverse = np.unique(r, return_inverse=True)
                    out[positions[idx]] = ds[uniq][inverse]
        return out

    def lock(self, exclusive: bool = False, wait: bool = True, purpose: str = ""):
        """The space's lock (:mod:`probe.locks`); re-entrant within this store."""
        return _StoreLock(self, exclusive, wait, purpose)

    # -- writing -----------------------------------------------------------------------------------------

    def writer(self, rows_per_segment: int = 1024, max_seconds: float = 30.0, meta: dict | None = None):
        return SegmentWriter(self, rows_per_segment=rows_per_segment, max_seconds=max_seconds, meta=meta)

    def write_segment(self, keys: Sequence[str], features: np.ndarray, paths: Sequence[str] | None = None,
                      meta: dict | None = None, name: str | None = None) -> Path | None:
        """Write one complete segment atomically (temp file, fsync, rename) and index it.

        ``name`` (``seg-*.h5``) names the segment by its content instead of time + pid + random: a writer that may
        retry the same rows (a distributed task) then never publishes a duplicate; an existing name is kept.
        """
        keys = list(keys)
        if not keys:
            return None
        features = np.asarray(features)
        if features.shape != (len(keys), self.space.dim):
            raise ValueError(f"features have shape {features.shape}, expected ({len(keys)}, {self.space.dim})")
        if not np.isfinite(features).all():
            raise ValueError("refusing to cache non-finite features")
        with np.errstate(over="ignore"):
            data = features.astype(self.space.dtype, copy=False)
        if not np.isfinite(data).all():  # finite float32 values beyond float16's range (65504) become inf
            raise ValueError(f"features overflow the storage dtype {self.space.dtype}; use dtype float32")
        key_bytes = np.array([k.encode() for k in keys], dtype="S64")
        if name is None:
            name = f"seg-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:12]}.h5"
        elif not _SEGMENT_NAME.match(name):
            raise ValueError(f"segment name {name!r} does not match seg-*.h5")
        final = self.segments_dir / name
        if final.exists():
            return final
        # Written as .tmp-<pid>-<rand>-seg-....h5, fsync'ed, then renamed: readers only ever see complete segments.
        with atomic_path(final) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["space"] = json.dumps(self.space.to_dict(), sort_keys=True)
            f.attrs["space_digest"] = self.space.digest
            f.attrs["rows"] = len(keys)
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            f.attrs["features_sha256"] = hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()
            f.attrs["keys_sha256"] = hashlib.sha256(key_bytes.tobytes()).hexdigest()
            for k, v in (meta or {}).items():
                f.attrs[k] = str(v) if isinstance(v, str) else v
            f.create_dataset("keys", data=key_bytes)
            f.create_dataset("features", data=data)
            if paths is not None:
                f.create_dataset("paths", data=list(paths), dtype=h5py.string_dtype())
        self.refresh()
        for seg in self._segments:  # rows this process just wrote from memory need no re-read
            if seg.path == final:
                seg.verified = True
        return final

    # -- maintenance -------------------------------------------------------------------------------------

    def stale_temporaries(self) -> list[Path]:
        """Temporary segments left by processes that no longer run (a killed extraction)."""
        out = []
        for p in self.segments_dir.glob(".tmp-*.h5"):
            try:
                pid = int(p.name.split("-")[1])
            except (IndexError, ValueError):
                pid = -1
            if pid < 0 or not _pid_alive(pid):
                out.append(p)
        return out

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file() and not p.is_symlink())

    def verify(self, repair: bool = False) -> VerifyReport:
        """Check every segment: attributes, shapes, key syntax, finite values and the checksums. With
        ``repair``, damaged segments are moved to ``<space>/quarantine/`` (under the exclusive lock) so the next
        extraction refills their rows."""
        report = VerifyReport(self.space.id)
        seen: set[bytes] = set()
        with self.lock(exclusive=repair, purpose="repair"):
            for p in self.segment_files():
                report.files += 1
                try:
                    with h5py.File(p, "r") as f:
                        self._check_segment_attrs(f, p)
                        keys = f["keys"][...]
                        problem = _check_segment_file(f, self.space, keys)
                except ProbeError as e:
                    report.problems.append(str(e))
                    if isinstance(e, CacheCorruptError):
                        report.damaged.append(p)
                    continue
                except (OSError, KeyError, ValueError) as e:
                    report.problems.append(f"{p.name}: unreadable ({_one_line(e)})")
                    report.damaged.append(p)
                    continue
                if problem is not None:
                    report.problems.append(f"{p.name}: {problem}")
                    report.damaged.append(p)
                    continue
                report.rows += len(keys)
                seen.update(keys.tolist())
            report.unique_rows = len(seen)
            if report.rows > report.unique_rows:
                report.notes.append(f"{report.rows - report.unique_rows} duplicate rows (harmless; `compact` drops them)")
            for p in self.stale_temporaries():
                report.notes.append(f"{p.name}: incomplete segment of an interrupted run (ignored; `compact` removes it)")
            if repair and report.damaged:
                self.close()
                report.quarantined = [self.quarantine(p) for p in report.damaged]
        return report

    def quarantine(self, segment: Path) -> Path:
        """Move a damaged segment out of the way (``<space>/quarantine/``); readers never look there."""
        qdir = self.path / QUARANTINE_DIR
        qdir.mkdir(exist_ok=True)
        target = qdir / segment.name
        os.replace(segment, target)
        fsync_dir(self.segments_dir)
        log.warning("%s: moved to %s", segment, target)
        return target

    def compact(self, wait: bool = True) -> tuple[int, int]:
        """Merge all verified segments into one (dropping duplicate rows) and remove stale temporaries.

        Returns (segments before, segments after). Runs under the space's exclusive lock, so no writer publishes
        and no reader reads meanwhile; only the segments merged are deleted. Damaged segments are never merged
        (their rows are not re-blessed with a fresh checksum) and are left in place for ``verify --repair``.
        Crash-safe: the merged segment is renamed into place before the old ones are removed, and a duplicate row
        is harmless to readers.
        """
        with self.lock(exclusive=True, wait=wait, purpose="compact"):
            self.reset()
            for p in self.stale_temporaries():
                p.unlink(missing_ok=True)
            self.ensure_verified()
            good = [s for s in self._segments if s.problem is None]
            before = len(self.segment_files())
            if len(good) <= 1:
                return before, before
            keys = self.keys()
            feats = np.empty((len(keys), self.space.dim), dtype=self.space.dtype)
            for start in range(0, len(keys), 65536):
                chunk = keys[start:start + 65536]
                feats[start:start + len(chunk)] = self._get(chunk, None)
            paths = self._paths_for(keys, good)
            self.close()
            new = self.write_segment(keys, feats, paths, meta={"compacted_from": len(good)})
            for seg in good:
                if seg.path != new:
                    seg.path.unlink(missing_ok=True)
            fsync_dir(self.segments_dir)
            damaged = [s.path.name for s in self._segments if s.problem is not None]
            self.reset()
            if damaged:
                log.warning("%s: %d damaged segments were not merged (%s); run `probe cache verify --repair`",
                            self.path, len(damaged), ", ".join(damaged[:3]))
            return before, len(self.segment_files())

    def _paths_for(self, keys: list[str], segments: list[Segment]) -> list[str] | None:
        found: dict[bytes, str] = {}
        for seg in segments:
            with h5py.File(seg.path, "r") as f:
                if "paths" not in f:
                    continue
                for k, p in zip(seg.keys.tolist(), f["paths"].asstr()[...]):
                    found.setdefault(k, p)
        if not found:
            return None
        return [found.get(k.encode(), "") for k in keys]

    def reset(self) -> None:
        """Forget the index and re-list the segments."""
        self.close()
        self._segments, self._index, self._seen = [], {}, set()
        self.refresh()

    def close(self) -> None:
        for h in self._handles.values():
            try:
                h.close()
            except Exception:  # pragma: no cover - closing a handle h5py already closed
                pass
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _StoreLock:
    """Re-entrant use of :func:`probe.locks.space_lock` by one store (compact reads under its own lock)."""

    def __init__(self, store: FeatureStore, exclusive: bool, wait: bool, purpose: str):
        self.store, self.exclusive, self.wait, self.purpose = store, exclusive, wait, purpose
        self._cm = None

    def __enter__(self):
        if self.store._locked == 0:
            self._cm = space_lock(self.store.path, exclusive=self.exclusive, wait=self.wait, purpose=self.purpose)
            self._cm.__enter__()
        self.store._locked += 1
        return self

    def __exit__(self, *exc):
        self.store._locked -= 1
        if self._cm is not None:
            self._cm.__exit__(*exc)


def _check_segment_file(f: h5py.File, space: FeatureSpace, keys: np.ndarray) -> str | None:
    """The first problem with an open segment's contents, or None: rows attribute, shapes, dtype, key syntax,
    finite values, ``features_sha256`` and (when present) ``keys_sha256``. Reads the features block by block."""
    try:
        rows = int(f.attrs.get("rows", -1))
    except (TypeError, ValueError):
        rows = -1
    ds = f["features"]
    if rows != len(keys) or ds.shape != (len(keys), space.dim):
        return f"{len(keys)} keys, features {ds.shape}, rows attribute {rows}, dim {space.dim}"
    if str(ds.dtype) != space.dtype:
        return f"features stored as {ds.dtype}, space says {space.dtype}"
    bad = [k for k in keys.tolist() if not _KEY_RE.match(k)]
    if bad:
        return f"{len(bad)} malformed keys, e.g. {bad[0]!r}"
    keys_sum = f.attrs.get("keys_sha256")
    if keys_sum is not None and keys_sum != hashlib.sha256(np.ascontiguousarray(keys).tobytes()).hexdigest():
        return "keys checksum mismatch (file damaged)"
    h = hashlib.sha256()
    finite = True
    for lo in range(0, len(keys), _BLOCK):
        block = np.ascontiguousarray(ds[lo:lo + _BLOCK])
        h.update(block.tobytes())
        finite = finite and bool(np.isfinite(block).all())
    if f.attrs.get("features_sha256") != h.hexdigest():
        return "features checksum mismatch (file damaged)"
    if not finite:
        return "non-finite feature values"
    return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class SegmentWriter:
    """Buffers rows and writes a complete segment every ``rows_per_segment`` rows or ``max_seconds``."""

    def __init__(self, store: FeatureStore, rows_per_segment: int = 1024, max_seconds: float = 30.0,
                 meta: dict | None = None):
        if rows_per_segment < 1:
            raise ValueError(f"rows_per_segment={rows_per_segment} must be >= 1")
        self.store = store
        self.rows_per_segment = rows_per_segment
        self.max_seconds = max_seconds
        self.meta = meta
        self._keys: list[str] = []
        self._paths: list[str] = []
        self._feats: list[np.ndarray] = []
        self._since = time.monotonic()
        self.rows_written = 0
        self.segments_written = 0

    def add(self, keys: Sequence[str], features: np.ndarray, paths: Sequence[str] | None = None) -> None:
        self._keys.extend(keys)
        self._paths.extend(paths if paths is not None else [""] * len(keys))
        self._feats.append(np.asarray(features, dtype=np.float32))
        while len(self._keys) >= self.rows_per_segment:
            self._flush(self.rows_per_segment)
        if self._keys and time.monotonic() - self._since >= self.max_seconds:
            self.flush()

    def _flush(self, n: int) -> None:
        feats = np.concatenate(self._feats) if len(self._feats) > 1 else self._feats[0]
        self.store.write_segment(self._keys[:n], feats[:n], self._paths[:n], meta=self.meta)
        self.rows_written += n
        self.segments_written += 1
        self._keys, self._paths = self._keys[n:], self._paths[n:]
        self._feats = [feats[n:]] if len(self._keys) else []
        self._since = time.monotonic()

    def flush(self) -> None:
        if self._keys:
            self._flush(len(self._keys))

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        # Flush complete rows even when the run stops on an error: finished work is never thrown away.
        self.close()


class SpaceNotFoundError(ProbeError):
    """The cache holds no feature space with this description (nothing cached for it yet)."""


class FeatureCache:
    """A cache root holding one directory per feature space."""

    def __init__(self, root: str | os.PathLike = DEFAULT_CACHE):
        self.root = Path(root)

    @property
    def spaces_dir(self) -> Path:
        return self.root / "spaces"

    def open(self, space: FeatureSpace, create: bool = True) -> FeatureStore:
        """The store of ``space``; created when absent (unless ``create=False``: SpaceNotFoundError)."""
        path = self.spaces_dir / space.id
        if not (path / SPACE_FILE).exists():
            if not create:
                raise SpaceNotFoundError(f"{self.root}: no cached features for space {space.id} ({space.backbone})")
            ensure_folder(path / "segments", "cache folder")
            atomic_write_text(path / SPACE_FILE, json.dumps(space.to_dict(), indent=2, sort_keys=True) + "\n")
        return self.open_path(path, expected=space)

    def check_writable(self, space: FeatureSpace) -> None:
        """A one-line error naming the folder when rows of ``space`` cannot be written here (read-only cache)."""
        seg = self.spaces_dir / space.id / "segments"
        if not os.access(seg, os.W_OK | os.X_OK):
            raise ProbeError(f"{seg}: cache folder is not writable; give a writable --cache, or use a command "
                             "that only reads (predict / evaluate without --cache)")

    def open_path(self, path: str | os.PathLike, expected: FeatureSpace | None = None,
                  scan: bool = True) -> FeatureStore:
        """Open a space directory; with ``expected``, refuse (CacheMismatchError) if its description differs.

        ``scan=False`` skips indexing the segments: enough for :meth:`FeatureStore.verify`, which must be able to
        report on a space whose segments cannot all be read.
        """
        path = Path(path)
        try:
            text = (path / SPACE_FILE).read_text()
        except (FileNotFoundError, NotADirectoryError) as e:
            raise ProbeError(f"{path}: not a feature-space directory (no {SPACE_FILE})") from e
        except (OSError, UnicodeDecodeError) as e:
            raise CacheCorruptError(f"{path / SPACE_FILE}: unreadable ({_one_line(e)})") from e
        if len(text) > 1 << 20:
            raise CacheCorruptError(f"{path / SPACE_FILE}: {len(text)} bytes is too large for a space description")
        try:
            found = FeatureSpace.from_dict(json.loads(text))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise CacheCorruptError(f"{path / SPACE_FILE}: unreadable ({_one_line(e)})") from e
        if expected is not None:
            name = expected.first_difference(found)
            if name is not None:
                raise CacheMismatchError(name, getattr(expected, name), getattr(found, name), str(path))
        return FeatureStore(path, found, scan=scan)

    def space_dirs(self) -> list[Path]:
        """Space folders directly under ``spaces/`` (real folders only: a symlink is never followed)."""
        if not self.spaces_dir.is_dir():
            return []
        return sorted(p for p in self.spaces_dir.iterdir()
                      if not p.is_symlink() and p.is_dir() and (p / SPACE_FILE).is_file())

    def find(self, space_id: str) -> Path:
        """The directory of a space given its id or any unique prefix of its digest (hex digits only: a path
        such as ``../x`` is refused, never resolved)."""
        if not isinstance(space_id, str) or not _SPACE_ID.match(space_id):
            raise ProbeError(f"{space_id!r} is not a feature-space id (hex digits, see `probe cache info`)")
        matches = [p for p in self.space_dirs() if p.name.startswith(space_id[:16])]
        if len(matches) != 1:
            raise ProbeError(f"{self.root}: {len(matches)} feature spaces match {space_id!r}")
        return matches[0]

    def stores(self, scan: bool = True) -> list[FeatureStore]:
        return [self.open_path(p, scan=scan) for p in self.space_dirs()]

    def summary(self) -> list[dict]:
        """One JSON-able row per space: id, description, rows, segments, bytes on disk."""
        out = []
        for s in self.stores():
            out.append({"id": s.space.id, "digest": s.space.digest, "space": s.space.to_dict(), "rows": len(s),
                        "segments": len(s.segment_files()), "bytes": s.nbytes()})
            s.close()
        return out

    def remove(self, space_id: str, wait: bool = True) -> Path:
        """Delete one feature space (under its exclusive lock). Returns the folder removed."""
        path = self.find(space_id)
        with space_lock(path, exclusive=True, wait=wait, purpose="remove it"):
            doomed = path.with_name(f".rm-{os.getpid()}-{path.name}")
            os.replace(path, doomed)  # gone for readers at once; a crash leaves a .rm- folder, never a half space
            shutil.rmtree(doomed)
        return path
