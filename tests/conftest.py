"""Fixtures and helpers shared by the whole test suite.

Everything here is generated on the fly: images are written with numpy + Pillow into ``tmp_path``, the backbone is
the registered ``test:tiny-cnn``; nothing needs a network or a GPU. Plain helpers can be imported from other test
files with ``from conftest import make_image, invoke, ...`` (pytest puts ``tests/`` on ``sys.path``).

This module does not import torch at import time, so test files for torch-free modules (cache, heads) stay light.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = "test:tiny-cnn"

#: Base colour of each class in ``image_folder``: far apart, so a linear head separates them easily.
CLASS_COLORS = {"cat": (220, 40, 40), "dog": (40, 200, 60), "fish": (40, 60, 220)}


# -- images --------------------------------------------------------------------------------------------------


def image_array(seed: int, size: tuple[int, int] = (40, 40), color: tuple[int, int, int] | None = None) -> np.ndarray:
    """A (height, width, 3) uint8 pattern: a seeded gradient plus noise, around ``color`` when given."""
    w, h = size
    rng = np.random.default_rng(seed)
    base = np.asarray(color if color is not None else rng.integers(0, 256, 3), dtype=np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    gradient = (np.sin(xx / max(w, 1) * 3 + seed) + np.cos(yy / max(h, 1) * 2 + seed))[..., None] * 15.0
    noise = rng.normal(0.0, 25.0, (h, w, 3))
    return np.clip(base + gradient + noise, 0, 255).astype(np.uint8)


def make_image(path, seed: int, size: tuple[int, int] = (40, 40), mode: str = "RGB",
               color: tuple[int, int, int] | None = None, **save_kwargs) -> Path:
    """Write a seeded image of ``size`` (width, height) in Pillow ``mode`` to ``path`` (format from the suffix).

    Same arguments give the same pixels (and, for lossless formats, the same bytes). Modes: any Pillow can
    convert RGB to (L, LA, RGBA, CMYK, P, 1, ...), plus ``I;16`` (16-bit grayscale, PNG/TIFF).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = image_array(seed, size, color)
    if mode == "I;16":
        gray = rgb.astype(np.uint32).sum(axis=2) * 85  # 0..65025: uses the full 16-bit range
        im = Image.fromarray(gray.astype(np.uint16))
    elif mode == "P":
        im = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    else:
        im = Image.fromarray(rgb).convert(mode)
    im.save(path, **save_kwargs)
    return path


def image_bytes(seed: int, size: tuple[int, int] = (40, 40), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """Encoded bytes of the same kind of image :func:`make_image` writes."""
    buf = io.BytesIO()
    Image.fromarray(image_array(seed, size)).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def make_image_folder(root, classes: dict[str, tuple[int, int, int]] | None = None, per_class: int = 8,
                      size: tuple[int, int] = (40, 40), suffix: str = ".png", seed: int = 0) -> Path:
    """``root/<class>/<class>_<i><suffix>`` with class-dependent colours; every file has distinct bytes."""
    root = Path(root)
    classes = classes or CLASS_COLORS
    for c, (name, color) in enumerate(sorted(classes.items())):
        for i in range(per_class):
            make_image(root / name / f"{name}_{i:03d}{suffix}", seed=seed + 1000 * c + i, size=size, color=color)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A class-per-folder tree: cat/ dog/ fish/, 8 distinct 40x40 PNGs each, separable by colour."""
    return make_image_folder(tmp_path / "images")


# -- the bad-file corpus -------------------------------------------------------------------------------------


@dataclass
class BadFiles:
    """A folder of awkward inputs. ``good`` decode (after conversion to RGB), ``bad`` must be reported as failures
    when extracting with ``max_pixels`` (``too_big.png`` is only bad because of that limit)."""

    dir: Path
    good: dict[str, Path] = field(default_factory=dict)
    bad: dict[str, Path] = field(default_factory=dict)
    max_pixels: int = 10_000

    @property
    def all(self) -> list[Path]:
        return sorted([*self.good.values(), *self.bad.values()])


def _cut(data: bytes, fraction: float = 0.5) -> bytes:
    return data[: int(len(data) * fraction)]


def make_bad_files(root) -> BadFiles:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    bf = BadFiles(root)
    # Decodable, but not plain 8-bit RGB.
    bf.good["cmyk.jpg"] = make_image(root / "cmyk.jpg", seed=11, mode="CMYK")
    bf.good["gray16.png"] = make_image(root / "gray16.png", seed=12, mode="I;16")
    pal = Image.fromarray(image_array(13)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(root / "palette_alpha.png", transparency=0)
    bf.good["palette_alpha.png"] = root / "palette_alpha.png"
    bf.good["one_pixel.png"] = make_image(root / "one_pixel.png", seed=14, size=(1, 1))
    # Not decodable.
    (root / "empty.jpg").write_bytes(b"")
    bf.bad["empty.jpg"] = root / "empty.jpg"
    # Noise images compress badly, so cutting the file in half always lands inside the pixel data.
    (root / "truncated.png").write_bytes(_cut(image_bytes(15, (64, 64), "PNG")))
    bf.bad["truncated.png"] = root / "truncated.png"
    (root / "truncated.jpg").write_bytes(_cut(image_bytes(16, (64, 64), "JPEG")))
    bf.bad["truncated.jpg"] = root / "truncated.jpg"
    (root / "notes.jpg").write_text("this is a text file with an image extension\n")
    bf.bad["notes.jpg"] = root / "notes.jpg"
    # Decodable, but over the pixel limit used with this corpus.
    bf.bad["too_big.png"] = make_image(root / "too_big.png", seed=17, size=(200, 200))
    return bf


@pytest.fixture
def bad_files(tmp_path) -> BadFiles:
    """The bad-file corpus (see :class:`BadFiles`), in its own folder."""
    return make_bad_files(tmp_path / "corpus")


# -- running probe -------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def machine_tuning_memo(tmp_path, monkeypatch) -> Path:
    """The per-machine batch-size memo (probe.tuning.memo_file) of this test: in its tmp_path, never the user's
    cache folder. Subprocesses started by the test inherit it."""
    path = tmp_path / "machine" / "tuning.json"
    monkeypatch.setenv("PROBE_TUNING_FILE", str(path))
    return path


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    """A fresh (not yet created) feature-cache folder."""
    return tmp_path / "cache"


def invoke(*args, expect: int | None = 0):
    """Run the ``probe`` CLI in-process with click's CliRunner; check the exit code unless ``expect`` is None."""
    from click.testing import CliRunner

    from probe.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if expect is not None and result.exit_code != expect:
        raise AssertionError(
            f"probe {' '.join(map(str, args))} exited {result.exit_code}, expected {expect}\n{result.output}"
        )
    return result


def probe_command(*args) -> list[str]:
    """argv for running the CLI in a fresh interpreter (``python -m probe.cli ...``)."""
    return [sys.executable, "-m", "probe.cli", *map(str, args)]


def subprocess_env(**extra) -> dict[str, str]:
    """The environment for a probe subprocess: this checkout importable, no GPU, no progress bars."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_probe(*args, timeout: float = 120, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python -m probe.cli ARGS`` to completion and return the finished process (text output)."""
    return subprocess.run(probe_command(*args), capture_output=True, text=True, timeout=timeout,
                          env=env or subprocess_env(), cwd=cwd or REPO_ROOT)


# -- markers -------------------------------------------------------------------------------------------------


def pytest_collection_modifyitems(config, items):
    """Skip ``@pytest.mark.gpu`` tests without CUDA (torch is only imported when such a test was collected)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)
