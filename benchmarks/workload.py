"""The workload every benchmark measures: image files, loaded backbones, extraction, the shared cached features.

* :class:`ImageSource` — Fashion-MNIST (``probe.datasets``) or generated class-patterned images of the same shape
  when the dataset is not installed (``--data auto`` falls back, so CI exercises the benchmarks anyway);
* :func:`image_folder`, :func:`shared_folders`, :func:`pool_files` — PNG files written once into the work folder;
* :func:`backbone`, :func:`tuned_batch_size`, :func:`default_workers` — backbones loaded once per process, and
  probe's own choice of batch size and loader workers on this machine;
* :func:`extract` — one ``probe.extract`` call, timed; :func:`shared_features` — the shared subset's features
  from the shared cache (benchmarks 3, 5, 6, 7); :func:`fit_head` — a head fit shared by benchmarks 5, 6, 7;
* :func:`preload`, :func:`forward_throughput` — the forward pass alone on preloaded tensors (the compute limit).
"""

from __future__ import annotations

import logging
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from harness import BackboneRef, Config, Stopwatch

log = logging.getLogger("benchmarks")
N_CLASSES = 10


# -- images --------------------------------------------------------------------------------------------------


class ImageSource:
    """Where benchmark images come from: ``take(split, start, n) -> (uint8 images (n, 28, 28), int labels)``."""

    name = "?"

    def take(self, split: str, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class FashionMNISTSource(ImageSource):
    name = "fashion-mnist"

    def __init__(self, root: str | os.PathLike | None = None):
        from probe.datasets import load_fashion_mnist

        self._arrays = {split: load_fashion_mnist(split, root) for split in ("train", "test")}

    def take(self, split, start, n):
        images, labels = self._arrays[split]
        if start + n > len(images):
            raise ValueError(f"Fashion-MNIST {split} has {len(images)} images; asked for {start}..{start + n}")
        return images[start:start + n], labels[start:start + n]


class GeneratedSource(ImageSource):
    """Fashion-MNIST-shaped stand-in when the dataset is not installed: 28x28 grayscale gratings whose
    orientation and frequency depend on the class, plus per-image noise (seeded by split and index)."""

    name = "generated"

    def take(self, split, start, n):
        idx = np.arange(start, start + n)
        labels = (idx * 7 + (3 if split == "test" else 0)) % N_CLASSES
        yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
        images = np.empty((n, 28, 28), dtype=np.uint8)
        for j, (i, c) in enumerate(zip(idx, labels)):
            rng = np.random.default_rng([int(i), 1 if split == "test" else 0, 12345])
            angle = np.pi * c / N_CLASSES + rng.normal(0, 0.08)
            freq = 0.35 + 0.05 * (c % 3) + rng.normal(0, 0.01)
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
            img = 128 + 90 * wave + rng.normal(0, 25, (28, 28))
            images[j] = np.clip(img, 0, 255).astype(np.uint8)
        return images, labels.astype(np.int64)


@lru_cache(maxsize=None)
def image_source(kind: str = "auto") -> ImageSource:
    """``fashion-mnist`` (an error when absent), ``generated``, or ``auto``: Fashion-MNIST when installed."""
    if kind == "generated":
        return GeneratedSource()
    from probe.errors import ProbeError

    try:
        return FashionMNISTSource()
    except (ProbeError, OSError) as e:
        if kind == "fashion-mnist":
            raise
        log.warning("Fashion-MNIST not available (%s); using generated images", e)
        return GeneratedSource()


def image_folder(cfg: Config, split: str, start: int, n: int, name: str) -> Path:
    """Images ``start .. start+n`` of ``split`` as PNG class folders under the work folder (written once: files
    already there are left untouched, so probe's hash memo stays valid between runs)."""
    from probe.datasets import write_image_folder

    out = cfg.work / "data" / cfg.source.name / f"{name}-{split}-{start}-{n}"
    done = out / ".complete"
    if not done.exists():
        images, labels = cfg.source.take(split, start, n)
        write_image_folder(images, labels, out, start=start, prefix=f"{split}-")
        done.write_text(f"{n}\n")
    return out


def shared_folders(cfg: Config) -> tuple[Path, Path]:
    """(train folder, test folder) of the shared subset: the first ``sizes.train`` / ``sizes.test`` images."""
    return (image_folder(cfg, "train", 0, cfg.sizes.train, "shared"),
            image_folder(cfg, "test", 0, cfg.sizes.test, "shared"))


def pool_files(cfg: Config, n: int) -> list[str]:
    """``n`` PNG files for speed measurements, interleaved across classes; taken from the end of the training
    split (disjoint from the shared subset at the default scale)."""
    from probe import resolve

    size = cfg.sizes.pool
    start = max(0, 60000 - size) if cfg.source.name == "fashion-mnist" else 100000
    folder = image_folder(cfg, "train", start, size, "pool")
    paths = sorted((r.path for r in resolve(folder)), key=lambda p: Path(p).name)  # by index, not by class
    if n > len(paths):
        raise ValueError(f"asked for {n} pool files, the pool holds {len(paths)}")
    return paths[:n]


def fresh_dir(path: Path) -> Path:
    """An empty folder at ``path`` (removed first if present)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# -- backbones, batch size, extraction -----------------------------------------------------------------------


_BACKBONES: dict = {}


def backbone(ref: BackboneRef, shared: bool = True):
    """A loaded probe Backbone (one per process and name unless ``shared=False``) and its load seconds."""
    from probe import load_backbone

    if shared and ref in _BACKBONES:
        return _BACKBONES[ref]
    with Stopwatch() as sw:
        bb = load_backbone(ref.name, ref.weights)
    if shared:
        _BACKBONES[ref] = (bb, sw.seconds)
    return bb, sw.seconds


def device_and_precision(cfg: Config):
    from probe.engine import resolve_device, resolve_precision

    dev = resolve_device(cfg.device)
    return dev, resolve_precision(None, dev)


_TUNED: dict = {}


def tuned_batch_size(cfg: Config, ref: BackboneRef) -> tuple[int, float]:
    """The batch size probe's auto-tuning picks for this backbone on this machine, and what the tuning cost.

    Measured once per process (see :func:`tune`). Benchmarks pass it explicitly so that every cold-cache run
    measures extraction, not the one-time tuning."""
    if ref not in _TUNED:
        _TUNED[ref] = tune(cfg, ref)
    return _TUNED[ref]


def tune(cfg: Config, ref: BackboneRef) -> tuple[int, float]:
    """Run probe's batch-size auto-tuning with a fresh memo, as a new cache folder does: (batch size, seconds)."""
    from probe.engine import DEFAULT_CPU_BATCH, DEFAULT_CUDA_BATCH
    from probe.tuning import tuned_batch_size as probe_tuning

    bb, _ = backbone(ref)
    dev, precision = device_and_precision(cfg)
    bb.to(dev)
    memo = fresh_dir(cfg.work / "tuning" / ref.tag) / "tuning.json"
    default = DEFAULT_CUDA_BATCH if dev.type == "cuda" else DEFAULT_CPU_BATCH
    with Stopwatch() as sw:
        bs = probe_tuning(bb, dev, precision, memo, default)
    log.info("%s: auto-tuned batch size %d (tuning took %.1f s)", ref, bs, sw.seconds)
    return bs, sw.seconds


def default_workers(cfg: Config) -> int:
    from probe.engine import default_workers as workers

    return workers(device_and_precision(cfg)[0])


def extract(cfg: Config, inputs, bb, cache: Path, *, fresh: bool = False, **options):
    """``probe.extract`` with a preloaded backbone; returns (FeatureSet, wall seconds of the call)."""
    import probe

    if fresh:
        fresh_dir(cache)
    options.setdefault("progress", False)
    options.setdefault("runtime", "eager")  # benchmarks 1-8 measure eager PyTorch; benchmark 9 compares runtimes
    options.setdefault("device", cfg.device)
    with Stopwatch() as sw:
        fs = probe.extract(inputs, backbone=bb, cache=str(cache), **options)
    return fs, sw.seconds


def shared_cache(cfg: Config) -> Path:
    return cfg.work / "cache" / "shared"


def shared_features(cfg: Config):
    """(train FeatureSet, test FeatureSet) of the shared subset with the main backbone, from the shared cache
    (extracting whatever is missing, e.g. when a benchmark runs on its own)."""
    from probe import Extractor, resolve
    from probe.errors import ProbeError

    bb, _ = backbone(cfg.backbone)
    out = []
    for name, folder in zip(("train", "test"), shared_folders(cfg)):
        records = resolve(folder)
        try:  # cached: no batch-size tuning needed
            fs = Extractor(bb, str(shared_cache(cfg)), device=cfg.device, progress=False).extract(
                records, extract_missing=False)
        except ProbeError:
            bs, _ = tuned_batch_size(cfg, cfg.backbone)
            fs = Extractor(bb, str(shared_cache(cfg)), batch_size=bs, device=cfg.device, progress=False).extract(
                records)
            log.info("shared %s features: %s", name, fs.stats.summary())
        if fs.failures:
            raise RuntimeError(f"{name}: {len(fs.failures)} inputs failed (first: {fs.failures[0].error})")
        out.append(fs)
    return tuple(out)


def labels(fs) -> np.ndarray:
    """The labels of a FeatureSet as a string array."""
    return np.asarray(fs.y).astype(str)


_HEAD_FITS: dict = {}


def fit_head(name: str, X: np.ndarray, y: np.ndarray, seed: int = 0, **options):
    """``probe.sweep.fit_head(name, X, y, val_split=0.1, seed=seed, **options)``, remembered in this process by the
    content of X and y: benchmarks 5, 6 and 7 train the same logreg on the same features, and a fit is
    deterministic, so it runs once (its ``fit_seconds`` is that run's)."""
    import hashlib

    from probe.sweep import fit_head as fit

    digest = hashlib.sha256(np.ascontiguousarray(X).tobytes())
    digest.update("\0".join(map(str, y)).encode())
    key = (name, digest.hexdigest(), seed, repr(sorted(options.items())))
    if key not in _HEAD_FITS:
        _HEAD_FITS[key] = fit(name, X, y, val_split=0.1, seed=seed, **options)
    return _HEAD_FITS[key]


# -- forward pass on preloaded tensors ------------------------------------------------------------------------


def preload(bb, files: Sequence[str]):
    """The files decoded and preprocessed the way the engine does (resize + crop to uint8, then normalized to
    float32), as one (n, 3, crop, crop) tensor laid out channels_last in memory, like the engine's model input."""
    import torch

    from probe.preprocess import decode_image

    pre = bb.preprocess
    nhwc = np.stack([pre.normalize(pre.resize_crop(decode_image(p))) for p in files])
    return torch.from_numpy(nhwc).permute(0, 3, 1, 2)


def forward_throughput(cfg: Config, bb, x, batch_size: int) -> tuple[float, float]:
    """(images/s, seconds) of the backbone alone over ``x`` (from :func:`preload`, moved to the device): the
    compute limit.

    Same as the engine's model step: batches are slices of the channels_last tensor (made contiguous NCHW
    per batch for backbones that do not want channels_last, as the engine does), ``features`` under
    inference_mode (autocast on CUDA), copied back as float32 numpy. One warm-up batch is not counted.
    (Converting all batches up front into separate tensors measured 10-25 % slower on the 2-core CPU box:
    holding them all alive changes the allocator's behaviour, which would understate the limit.)"""
    import torch

    dev, precision = device_and_precision(cfg)
    bb.to(dev)
    x = x.to(dev)

    def batch(i):
        b = x[i:i + batch_size]
        return b if bb.channels_last else b.contiguous()

    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
        bb.features(batch(0)).float().cpu().numpy()
        with Stopwatch() as sw:
            for i in range(0, len(x), batch_size):
                bb.features(batch(i)).float().cpu().numpy()
    return len(x) / sw.seconds, sw.seconds
