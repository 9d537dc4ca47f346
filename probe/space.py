"""The feature space: everything that determines a feature value. Its digest names a cache folder.

Shared by the backbone registry (which describes the space a loaded backbone produces) and the HDF5 cache (which
stores rows per space), so neither has to import the other. No torch, no h5py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from .errors import CacheCorruptError

#: Version of the on-disk cache format; part of every space's identity (docs/cache-format.md).
FORMAT_VERSION = 1
DTYPES = ("float32", "float16")
_FIELD_TYPES = {"backbone": str, "weights_sha256": str, "preprocess": dict, "layer": str, "pooling": str,
                "dim": int, "dtype": str, "precision": str, "format_version": int}
_REQUIRED = ("backbone", "weights_sha256", "preprocess", "layer", "pooling", "dim")


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
        """A space from its JSON description, read from disk: every field's presence and type is checked
        (CacheCorruptError naming the field), unknown fields are refused."""
        if not isinstance(d, dict):
            raise CacheCorruptError(f"feature-space description is a {type(d).__name__}, not an object")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(d) - set(names)
        if unknown:
            raise CacheCorruptError(f"feature-space description has unknown fields {sorted(unknown)}")
        for name, types in _FIELD_TYPES.items():
            if name not in d:
                if name in _REQUIRED:
                    raise CacheCorruptError(f"feature-space description lacks {name!r}")
                continue
            value = d[name]
            if not isinstance(value, types) or isinstance(value, bool):
                raise CacheCorruptError(f"feature-space field {name!r} has a {type(value).__name__}: {value!r}")
        try:
            return cls(**{k: d[k] for k in names if k in d})
        except ValueError as e:
            raise CacheCorruptError(f"feature-space description: {e}") from e

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
