"""Decoding and preprocessing: bytes on disk -> RGB image -> normalized CHW float32 array.

``Preprocess`` is *data* attached to a backbone's weights (like torchvision's ``Weights.transforms``), never
re-typed at call sites. It is part of the feature-space identity, so any change to it lands in a new cache space.
No torch import: the arrays become tensors in the extraction engine.
"""

from __future__ import annotations

import dataclasses
import io
import math
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .defaults import DEFAULT_MAX_PIXELS
from .errors import ImageDecodeError
from .files import NotRegularFileError, open_regular

#: How a JPEG is decoded: ``exact`` decodes every pixel; ``reduced`` lets libjpeg scale the DCT by 1/2, 1/4 or 1/8
#: while decoding (Pillow's ``Image.draft``), keeping the shorter side at least ``REDUCED_MARGIN`` x ``resize`` so
#: the resize that follows still antialiases. Other formats decode the same way under both.
DECODES = ("exact", "reduced")
REDUCED_MARGIN = 2
_DRAFT_FORMATS = ("JPEG", "MPO")  # MPO: camera JPEGs with extra frames; frame 0 is a plain JPEG

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize``, center-crop ``crop``×``crop``, scale to [0,1], normalize.

    ``decode="reduced"`` decodes JPEGs at a reduced scale (see :data:`DECODES`): 2.5-6x less decode time on
    camera-sized photos, within the tolerance stated in docs/cache-format.md of the exact path. It is part of the
    identity (a reduced space never mixes with an exact one); ``to_dict`` omits it when ``exact`` so the
    descriptions, and digests, of exact spaces are what they were before the field existed.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    decode: str = "exact"

    def __post_init__(self):
        if self.decode not in DECODES:
            raise ValueError(f"decode={self.decode!r} is not one of {list(DECODES)}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation={self.interpolation!r} is not one of {sorted(_INTERPOLATION)}")
        if self.crop > self.resize:
            raise ValueError(f"crop={self.crop} is larger than resize={self.resize}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            **({"decode": self.decode} if self.decode != "exact" else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})

    @property
    def min_decode_side(self) -> int | None:
        """The shortest side a reduced-scale decode may produce (None: decode every pixel)."""
        return REDUCED_MARGIN * self.resize if self.decode == "reduced" else None

    def load(self, source: str | Path | bytes | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Decode ``source`` (as this preprocess asks) and resize + crop it: uint8 (crop, crop, 3)."""
        return self.resize_crop(decode_image(source, max_pixels, self.min_decode_side), max_pixels)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """Size after resizing the shorter side to ``resize`` (before the center crop)."""
        scale = self.resize / min(width, height)
        return max(self.resize, round(width * scale)), max(self.resize, round(height * scale))

    def resize_crop(self, image: Image.Image, max_pixels: int | None = None) -> np.ndarray:
        """PIL RGB image -> uint8 array (crop, crop, 3): the geometric half of the preprocess.

        The extraction engine ships these uint8 arrays (a quarter of float32's bytes) and normalizes whole
        batches with :meth:`normalize`'s arithmetic on the device. With ``max_pixels``, an image whose *resized*
        size would exceed it (an extreme aspect ratio such as 10000x1 becomes ~2.2M x 224) is refused with
        :class:`ImageDecodeError` instead of allocating gigabytes.
        """
        w, h = image.size
        size = self.resized_size(w, h)
        if max_pixels is not None and size[0] * size[1] > max_pixels:
            raise ImageDecodeError(
                f"{image.filename if getattr(image, 'filename', '') else '<image>'}: {w}x{h} would be resized to "
                f"{size[0]}x{size[1]}, over the pixel limit of {max_pixels} (extreme aspect ratio)"
            )
        if size != (w, h):
            image = image.resize(size, _INTERPOLATION[self.interpolation])
        left = (size[0] - self.crop) // 2
        top = (size[1] - self.crop) // 2
        return np.asarray(image.crop((left, top, left + self.crop, top + self.crop)), dtype=np.uint8)

    def normalize(self, arr: np.ndarray) -> np.ndarray:
        """uint8 (..., 3) -> float32 ``(x / 255 - mean) / std``, channels last. The engine applies the same three
        float32 operations, in the same order, to batches in torch, so both give the same values."""
        x = arr.astype(np.float32) / np.float32(255)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    def __call__(self, image: Image.Image, max_pixels: int | None = None) -> np.ndarray:
        """PIL RGB image -> normalized float32 array of shape (3, crop, crop)."""
        return np.ascontiguousarray(self.normalize(self.resize_crop(image, max_pixels)).transpose(2, 0, 1))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: EXIF orientation applied, alpha composited on white, 16-bit scaled down."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image


def decode_image(source: str | Path | bytes | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int | None = None) -> Image.Image:
    """Open an image from a path, raw bytes or a PIL image and return it as RGB.

    With ``min_side``, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling), never so far that
    its shorter side drops below ``min_side``; the shorter side is the same before and after EXIF rotation.
    Other inputs ignore it.

    Raises :class:`ImageDecodeError` naming the input and what is wrong, for undecodable, truncated, empty
    or over-limit (decompression bomb) inputs.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open_regular(source)
    except NotRegularFileError as e:
        raise ImageDecodeError(f"{name}: {e.strerror}") from e
    except (OSError, ValueError) as e:
        raise ImageDecodeError(f"{name}: cannot read ({getattr(e, 'strerror', None) or e})") from e
    with fp:
        try:
            with _pixel_limit(max_pixels):
                with Image.open(fp) as im:
                    w, h = im.size
                    if w * h > max_pixels:
                        raise ImageDecodeError(
                            f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}"
                        )
                    if min_side is not None and im.format in _DRAFT_FORMATS and min(w, h) >= 2 * min_side:
                        k = min_side / min(w, h)  # draft keeps both sides >= the size asked for
                        im.draft(None, (max(1, math.ceil(w * k)), max(1, math.ceil(h * k))))
                    im.load()
                    return to_rgb(im)
        except ImageDecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageDecodeError(f"{name}: exceeds the pixel limit of {max_pixels} ({e})") from e
        except Image.UnidentifiedImageError as e:
            size = _size(source)
            what = "empty file" if size == 0 else "not a recognizable image"
            raise ImageDecodeError(f"{name}: {what}") from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageDecodeError(f"{name}: corrupt or truncated image ({e})") from e


class _PixelLimit:
    """Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, a global) set to ``max_pixels``, and its
    DecompressionBombWarning turned into an error, while any decode runs; restored when the last one ends.

    Decode threads run concurrently, so each cannot save and restore the globals itself (an interleaving would
    leave them changed); the first decode to start installs them and the last to finish restores them. With
    different limits at once, Pillow gets the largest; :func:`decode_image` checks each call's own limit anyway.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.active: list[int] = []
        self.saved: int | None = None
        self.catcher: warnings.catch_warnings | None = None

    @contextmanager
    def __call__(self, max_pixels: int):
        with self.lock:
            if not self.active:
                self.saved = Image.MAX_IMAGE_PIXELS
                self.catcher = warnings.catch_warnings()
                self.catcher.__enter__()
                warnings.simplefilter("error", Image.DecompressionBombWarning)
            self.active.append(max_pixels)
            Image.MAX_IMAGE_PIXELS = max(self.active)
        try:
            yield
        finally:
            with self.lock:
                self.active.remove(max_pixels)
                if self.active:
                    Image.MAX_IMAGE_PIXELS = max(self.active)
                else:
                    Image.MAX_IMAGE_PIXELS = self.saved
                    self.catcher.__exit__(None, None, None)
                    self.catcher = None


_pixel_limit = _PixelLimit()


def _size(source) -> int:
    if isinstance(source, bytes):
        return len(source)
    try:
        return Path(source).stat().st_size
    except OSError:
        return -1
