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

import dataclasses
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

from .errors import CacheCorruptError, CacheMismatchError, ProbeError
from .files import atomic_path, atomic_write_text, fsync_dir

log = logging.getLogger(__name__)

FORMAT = "probe.feature-segment"
FORMAT_VERSION = 1
SPACE_FILE = "space.json"
DTYPES = ("float32", "float16")
_KEY_RE = re.compile(rb"^[0-9a-f]{64}$")
_BLOCK = 4096  # rows read per block when gathering features from a segment


@dataclass(frozen=True)
class FeatureSpace:
    """Everything that determines a feature value. Its digest names the cache directory."""

    backbone: str
    weights_sha256: str
    preprocess: dict
    layer: str
    pooling: str
    dim: int
    dtype: str = "float32"
    precision: str = "float32"
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {DTYPES}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpace":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(d) - set(names)
        if unknown:
            raise CacheCorruptError(f"feature-space description has unknown fields {sorted(unknown)}")
        return cls(**{k: d[k] for k in names if k in d})

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def id(self) -> str:
        """The directory name: the first 16 hex digits of the digest."""
        return self.digest[:16]

    def first_difference(self, other: "FeatureSpace") -> str | None:
        """Name of the first field in which ``other`` differs from this space, or None."""
        for f in dataclasses.fields(self):
            if getattr(self, f.name) != getattr(other, f.name):
                return f.name
        return None


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


@dataclass
class VerifyReport:
    space_id: str
    files: int = 0
    rows: int = 0
    unique_rows: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class FeatureStore:
    """The rows of one feature space: lookup by key, ordered gather, append through :class:`SegmentWriter`."""

    def __init__(self, path: Path, space: FeatureSpace, scan: bool = True):
        self.path = Path(path)
        self.space = space
        self.segments_dir = self.path / "segments"
        self._segments: list[Segment] = []
        self._index: dict[bytes, tuple[int, int]] = {}
        self._handles: dict[int, h5py.File] = {}
        self._seen: set[str] = set()
        if scan:  # scan=False: no index (and no error on a damaged segment), for verify() to report on it
            self.refresh()

    # -- reading -----------------------------------------------------------------------------------------

    def segment_files(self) -> list[Path]:
        return sorted(self.segments_dir.glob("seg-*.h5"))

    def refresh(self) -> None:
        """Pick up segments written since the last scan (by this or another process)."""
        for p in self.segment_files():
            if p.name in self._seen:
                continue
            try:
                with h5py.File(p, "r") as f:
                    self._check_segment_attrs(f, p)
                    keys = f["keys"][...]
            except (OSError, KeyError) as e:
                raise CacheCorruptError(f"{p}: unreadable segment ({e}); run `probe cache verify`") from e
            self._seen.add(p.name)
            i = len(self._segments)
            self._segments.append(Segment(p, keys, len(keys)))
            for row, k in enumerate(keys.tolist()):
                self._index.setdefault(k, (i, row))

    def _check_segment_attrs(self, f: h5py.File, p: Path) -> None:
        fmt = f.attrs.get("format")
        if fmt != FORMAT:
            raise CacheCorruptError(f"{p}: format={fmt!r}, expected {FORMAT!r}")
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise CacheMismatchError("format_version", FORMAT_VERSION, version, str(p))
        digest = f.attrs.get("space_digest")
        if digest != self.space.digest:
            found = FeatureSpace.from_dict(json.loads(f.attrs["space"]))
            name = self.space.first_difference(found) or "space_digest"
            raise CacheMismatchError(name, getattr(self.space, name, digest), getattr(found, name, digest), str(p))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key.encode() in self._index

    def keys(self) -> list[str]:
        return [k.decode() for k in self._index]

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys (in input order, without repeats) that have no row yet."""
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

    def get(self, keys: Sequence[str], out: np.ndarray | None = None) -> np.ndarray:
        """Features for ``keys`` in the requested order as float32 (n, dim).

        Only the requested rows are read: rows are grouped by segment and gathered block by block, so memory
        stays at the output plus one block, however large the cache is.
        """
        n = len(keys)
        if out is None:
            out = np.empty((n, self.space.dim), dtype=np.float32)
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

    # -- writing -----------------------------------------------------------------------------------------

    def writer(self, rows_per_segment: int = 1024, max_seconds: float = 30.0, meta: dict | None = None):
        return SegmentWriter(self, rows_per_segment=rows_per_segment, max_seconds=max_seconds, meta=meta)

    def write_segment(self, keys: Sequence[str], features: np.ndarray, paths: Sequence[str] | None = None,
                      meta: dict | None = None, name: str | None = None) -> Path | None:
        """Write one complete segment atomically (temp file, fsync, rename) and index it.

        ``name`` (``seg-*.h5``) replaces the default ``seg-<t>-<pid>-<rand>.h5``: a writer that names segments by
        their content (the distributed engine) makes a retried write land on the same name."""
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
        if name is not None and not (name.startswith("seg-") and name.endswith(".h5") and "/" not in name):
            raise ValueError(f"segment name {name!r} must look like seg-*.h5")
        final = self.segments_dir / (name or f"seg-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:12]}.h5")
        # Written as .tmp-<pid>-<rand>-seg-....h5, fsync'ed, then renamed: readers only ever see complete segments.
        with atomic_path(final) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["space"] = json.dumps(self.space.to_dict(), sort_keys=True)
            f.attrs["space_digest"] = self.space.digest
            f.attrs["rows"] = len(keys)
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            f.attrs["features_sha256"] = hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()
            for k, v in (meta or {}).items():
                f.attrs[k] = str(v) if isinstance(v, str) else v
            f.create_dataset("keys", data=np.array([k.encode() for k in keys], dtype="S64"))
            f.create_dataset("features", data=data)
            if paths is not None:
                f.create_dataset("paths", data=list(paths), dtype=h5py.string_dtype())
        self.refresh()
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
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def verify(self) -> VerifyReport:
        """Check every segment: attributes, shapes, key syntax, finite values and the features checksum."""
        report = VerifyReport(self.space.id)
        seen: set[bytes] = set()
        for p in self.segment_files():
            report.files += 1
            try:
                with h5py.File(p, "r") as f:
                    self._check_segment_attrs(f, p)
                    keys = f["keys"][...]
                    feats = f["features"][...]
                    expected_sum = f.attrs.get("features_sha256")
                    rows = int(f.attrs.get("rows", -1))
            except ProbeError as e:
                report.problems.append(str(e))
                continue
            except (OSError, KeyError) as e:
                report.problems.append(f"{p.name}: unreadable ({e})")
                continue
            if rows != len(keys) or feats.shape != (len(keys), self.space.dim):
                report.problems.append(
                    f"{p.name}: {len(keys)} keys, features {feats.shape}, rows attribute {rows}, dim {self.space.dim}"
                )
                continue
            if str(feats.dtype) != self.space.dtype:
                report.problems.append(f"{p.name}: features stored as {feats.dtype}, space says {self.space.dtype}")
            bad = [k for k in keys.tolist() if not _KEY_RE.match(k)]
            if bad:
                report.problems.append(f"{p.name}: {len(bad)} malformed keys, e.g. {bad[0]!r}")
            if not np.isfinite(feats).all():
                report.problems.append(f"{p.name}: non-finite feature values")
            if expected_sum != hashlib.sha256(np.ascontiguousarray(feats).tobytes()).hexdigest():
                report.problems.append(f"{p.name}: features checksum mismatch (file damaged)")
            report.rows += len(keys)
            seen.update(keys.tolist())
        report.unique_rows = len(seen)
        if report.rows > report.unique_rows:
            report.notes.append(f"{report.rows - report.unique_rows} duplicate rows (harmless; `compact` drops them)")
        for p in self.stale_temporaries():
            report.notes.append(f"{p.name}: incomplete segment of an interrupted run (ignored; `compact` removes it)")
        return report

    def compact(self) -> tuple[int, int]:
        """Merge all segments into one (dropping duplicate rows) and remove stale temporaries.

        Returns (segments before, segments after). Crash-safe: the merged segment is renamed into place before
        the old ones are removed, and a duplicate row is harmless to readers.
        """
        old = self.segment_files()
        for p in self.stale_temporaries():
            p.unlink(missing_ok=True)
        if len(old) <= 1:
            return len(old), len(old)
        keys = self.keys()
        feats = np.empty((len(keys), self.space.dim), dtype=self.space.dtype)
        for start in range(0, len(keys), 65536):
            chunk = keys[start:start + 65536]
            feats[start:start + len(chunk)] = self.get(chunk)
        paths = self._paths_for(keys)
        self.close()
        new = self.write_segment(keys, feats, paths, meta={"compacted_from": len(old)})
        for p in old:
            if p != new:
                p.unlink(missing_ok=True)
        fsync_dir(self.segments_dir)
        self._reset()
        return len(old), len(self.segment_files())

    def _paths_for(self, keys: list[str]) -> list[str] | None:
        found: dict[bytes, str] = {}
        for seg in self._segments:
            with h5py.File(seg.path, "r") as f:
                if "paths" not in f:
                    continue
                for k, p in zip(seg.keys.tolist(), f["paths"].asstr()[...]):
                    found.setdefault(k, p)
        if not found:
            return None
        return [found.get(k.encode(), "") for k in keys]

    def _reset(self) -> None:
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


class FeatureCache:
    """A cache root holding one directory per feature space."""

    def __init__(self, root: str | os.PathLike = "cache"):
        self.root = Path(root)

    @property
    def spaces_dir(self) -> Path:
        return self.root / "spaces"

    def open(self, space: FeatureSpace, create: bool = True) -> FeatureStore:
        """The store of ``space``; created when absent (unless ``create=False``)."""
        path = self.spaces_dir / space.id
        if not (path / SPACE_FILE).exists():
            if not create:
                raise ProbeError(f"{self.root}: no cached features for space {space.id} ({space.backbone})")
            (path / "segments").mkdir(parents=True, exist_ok=True)
            atomic_write_text(path / SPACE_FILE, json.dumps(space.to_dict(), indent=2, sort_keys=True) + "\n")
        return self.open_path(path, expected=space)

    def open_path(self, path: str | os.PathLike, expected: FeatureSpace | None = None,
                  scan: bool = True) -> FeatureStore:
        """Open a space directory; with ``expected``, refuse (CacheMismatchError) if its description differs.

        ``scan=False`` skips indexing the segments: enough for :meth:`FeatureStore.verify`, which must be able to
        report on a space whose segments cannot all be read.
        """
        path = Path(path)
        try:
            found = FeatureSpace.from_dict(json.loads((path / SPACE_FILE).read_text()))
        except FileNotFoundError as e:
            raise ProbeError(f"{path}: not a feature-space directory (no {SPACE_FILE})") from e
        except (json.JSONDecodeError, TypeError) as e:
            raise CacheCorruptError(f"{path / SPACE_FILE}: unreadable ({e})") from e
        if expected is not None:
            name = expected.first_difference(found)
            if name is not None:
                raise CacheMismatchError(name, getattr(expected, name), getattr(found, name), str(path))
        return FeatureStore(path, found, scan=scan)

    def find(self, space_id: str) -> Path:
        """The directory of a space given its id or any unique prefix of its digest."""
        matches = [p for p in self.spaces_dir.glob(f"{space_id[:16]}*") if (p / SPACE_FILE).exists()]
        if len(matches) != 1:
            raise ProbeError(f"{self.root}: {len(matches)} feature spaces match {space_id!r}")
        return matches[0]

    def stores(self, scan: bool = True) -> list[FeatureStore]:
        if not self.spaces_dir.exists():
            return []
        return [self.open_path(p, scan=scan) for p in sorted(self.spaces_dir.iterdir()) if (p / SPACE_FILE).exists()]

    def remove(self, space_id: str) -> None:
        shutil.rmtree(self.find(space_id))
