"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX, gzip), written out as image folders.

Used by ``make demo`` and the benchmarks to run probe on real files, the way users run it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError

FASHION_MNIST_DIR = Path(os.environ.get("PROBE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise InputError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise InputError(f"{path}: header says {shape}, file holds {arr.size} bytes")
    return arr.reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 28, 28), labels int64 (n,)) of the ``train`` (60k) or ``test`` (10k) split."""
    if split not in _FILES:
        raise InputError(f"split {split!r} is not one of {sorted(_FILES)}")
    root = Path(root) if root else FASHION_MNIST_DIR
    images, labels = (root / name for name in _FILES[split])
    if not images.exists():
        raise InputError(
            f"{images}: Fashion-MNIST not found; install it with `apt-get install dataset-fashion-mnist` "
            "or set PROBE_FASHION_MNIST to a folder holding the IDX .gz files"
        )
    return _read_idx(images), _read_idx(labels).astype(np.int64)


def write_image_folder(images: np.ndarray, labels: np.ndarray, out: str | os.PathLike, *, start: int = 0,
                       classes=FASHION_MNIST_CLASSES, prefix: str = "img") -> list[Path]:
    """Write ``images`` as PNG files under ``out/<class>/``; files already present are left untouched (so their
    mtime, and probe's hash memo, stay valid). Returns the paths in input order."""
    out = Path(out)
    paths = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        d = out / classes[int(lab)]
        p = d / f"{prefix}{start + i:05d}.png"
        if not p.exists():
            d.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".tmp-{p.name}")
            Image.fromarray(img).save(tmp, format="PNG")
            os.replace(tmp, p)
        paths.append(p)
    return paths


def fashion_mnist_folder(out: str | os.PathLike, split: str = "train", n: int | None = None, start: int = 0,
                         root: str | os.PathLike | None = None) -> Path:
    """Write images ``start .. start+n`` of a split as a class-per-folder PNG tree under ``out``; returns ``out``."""
    images, labels = load_fashion_mnist(split, root)
    stop = len(images) if n is None else min(len(images), start + n)
    write_image_folder(images[start:stop], labels[start:stop], out, start=start, prefix=f"{split}-")
    return Path(out)
