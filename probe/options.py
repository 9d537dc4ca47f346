"""Extraction options: the one description of how features are computed and where they are stored. No torch.

The engine (:class:`probe.engine.Extractor`), :class:`probe.sklearn.FeatureExtractor`, :class:`probe.model.ProbeModel`
and the CLI all build an :class:`ExtractOptions` and hand it down, so every option is named, defaulted and
validated once. Validation happens when the object is made, before anything touches the disk or loads a model:
a bad batch size fails before a cache folder is created.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass

from .defaults import DEFAULT_BACKBONE, DEFAULT_CACHE, DEFAULT_MAX_PIXELS, POOLINGS, RUNTIMES
from .errors import ProbeError
from .space import DTYPES

DECODES = ("exact", "reduced")  # probe.preprocess.DECODES, named here without importing Pillow
#: Accepted spellings of the compute precision; the engine maps them to float32 / bfloat16 / float16.
AMP_CHOICES = ("auto", "off", "bf16", "fp16", "float32", "fp32", "bfloat16", "float16")


class OptionError(ProbeError, ValueError):
    """An extraction option has a value probe cannot use (the message names the option)."""


@dataclass(frozen=True)
class ExtractOptions:
    """How features are extracted and stored.

    ``backbone``, ``weights``, ``layer``, ``pooling``, ``dtype``, ``decode`` (JPEG decoding, ``exact`` or
    ``reduced``; None: the backbone's default) and (through ``amp`` and ``device``) the compute precision decide
    the feature space; the rest decide only speed and where rows go: ``cache`` (None: no cache),
    ``write`` (False: read the cache, keep new features in memory), ``batch_size`` (None: tuned per device),
    ``workers`` (loader processes; None: by device), ``threads`` (decode threads, 0: decode in the calling
    thread; None: measured default), ``max_pixels`` (decompression-bomb limit), ``segment_rows`` (rows per cache
    segment), ``progress`` (None: a bar on a terminal only), ``runtime`` (what runs the backbone: auto, eager,
    onnxruntime, openvino; see :mod:`probe.runtime`).
    """

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    layer: str | None = None
    pooling: str | None = None
    dtype: str = "float32"
    decode: str | None = None
    amp: str | bool | None = "auto"
    device: str | None = None
    batch_size: int | None = None
    workers: int | None = None
    threads: int | None = None
    cache: str | None = DEFAULT_CACHE
    write: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    segment_rows: int = 1024
    progress: bool | None = None
    runtime: str = "auto"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen dataclass
        if not isinstance(self.backbone, str) or not self.backbone:
            raise OptionError(f"backbone={self.backbone!r} must be a registry name (see `probe backbones`)")
        for name in ("weights", "cache", "device"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                set_(name, os.fspath(value))
            elif value is not None and not isinstance(value, str):
                raise OptionError(f"{name}={value!r} must be a string or a path")
        if self.cache == "":
            raise OptionError("cache='' is not a folder; give a path, or None for no cache")
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
            raise OptionError(f"layer={self.layer!r} must be a submodule name")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise OptionError(f"pooling={self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.decode is not None and self.decode not in DECODES:
            raise OptionError(f"decode={self.decode!r} is not one of {', '.join(DECODES)}")
        if self.dtype not in DTYPES:
            raise OptionError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.amp is None:
            set_("amp", "auto")
        elif not isinstance(self.amp, bool) and self.amp not in AMP_CHOICES:
            raise OptionError(f"amp={self.amp!r} is not one of {', '.join(AMP_CHOICES[:4])}")
        for name, low in (("batch_size", 1), ("workers", 0), ("threads", 0), ("max_pixels", 1), ("segment_rows", 1)):
            value = getattr(self, name)
            if value is None and name in ("batch_size", "workers", "threads"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise OptionError(f"{name}={value!r} must be an integer >= {low}")
        if not isinstance(self.write, bool):
            raise OptionError(f"write={self.write!r} must be True or False")
        if self.runtime not in RUNTIMES:
            raise OptionError(f"runtime={self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise OptionError(f"progress={self.progress!r} must be True, False or None")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, **kwargs) -> "ExtractOptions":
        """Options from keyword arguments; an unknown name is an :class:`OptionError` with close matches.
        ``None`` for ``max_pixels`` / ``segment_rows`` / ``dtype`` / ``backbone`` means the default."""
        known = cls.names()
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
                raise OptionError(f"unknown extraction option {key!r}{hint}")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key in ("backbone", "dtype", "max_pixels", "segment_rows"):
            if key in kwargs and kwargs[key] is None:
                kwargs[key] = defaults[key]
        return cls(**kwargs)

    def replace(self, **changes) -> "ExtractOptions":
        """A copy with ``changes`` applied (validated like the original)."""
        unknown = set(changes) - set(self.names())
        if unknown:
            self.from_kwargs(**{k: changes[k] for k in unknown})  # raises, naming the unknown option
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
