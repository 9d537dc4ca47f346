"""Decoding (any mode -> RGB, refusing bad inputs with a message naming them) and Preprocess as data."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import image_bytes, make_image
from probe.errors import ImageDecodeError
from probe.preprocess import DEFAULT_MAX_PIXELS, Preprocess, decode_image, to_rgb

PRE = Preprocess(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


# -- Preprocess ----------------------------------------------------------------------------------------------


def test_preprocess_is_validated_data():
    with pytest.raises(ValueError, match="crop=40"):
        Preprocess(resize=32, crop=40)
    with pytest.raises(ValueError, match="cubic"):
        Preprocess(resize=32, crop=32, interpolation="cubic")
    p = Preprocess(resize=36, crop=32, mean=[0, 0, 0], std=[1, 1, 1], interpolation="bicubic")
    assert p.mean == (0.0, 0.0, 0.0) and isinstance(p.std, tuple)
    d = p.to_dict()
    assert d == {"resize": 36, "crop": 32, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                 "interpolation": "bicubic"}
    assert Preprocess.from_dict(d) == p
    assert hash(p) == hash(Preprocess.from_dict(d))  # frozen: usable as a dict key


def test_output_shape_dtype_and_normalization():
    im = Image.new("RGB", (50, 40), (255, 0, 51))
    x = PRE(im)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(x[0], 1.0, atol=1e-6)  # (1 - 0.5) / 0.5
    np.testing.assert_allclose(x[1], -1.0, atol=1e-6)
    np.testing.assert_allclose(x[2], (0.2 - 0.5) / 0.5, atol=1e-6)


def test_resize_shorter_side_then_center_crop():
    # 96x32: three vertical bands; the crop keeps exactly the middle (white) band.
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, 32:64] = 255
    p = Preprocess(resize=32, crop=32, mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest")
    np.testing.assert_array_equal(p(Image.fromarray(arr)), np.ones((3, 32, 32), np.float32))
    # A wide image is scaled so its *shorter* side becomes `resize`, then cropped to a square.
    wide = Image.fromarray(np.concatenate([np.zeros((10, 15, 3)), np.full((10, 15, 3), 255)], axis=1).astype(np.uint8))
    x = p(wide)
    assert x.shape == (3, 32, 32)
    assert x[:, :, :14].max() == 0.0 and x[:, :, 18:].min() == 1.0  # left half black, right half white


def test_tiny_image_is_upscaled():
    x = PRE(Image.new("RGB", (1, 1), (255, 255, 255)))
    assert x.shape == (3, 32, 32)
    np.testing.assert_allclose(x, 1.0, atol=1e-6)


# -- to_rgb --------------------------------------------------------------------------------------------------


def test_16_bit_grayscale_is_scaled_to_8_bit():
    im = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))
    assert im.mode == "I;16"
    rgb = to_rgb(im)
    assert rgb.mode == "RGB"
    assert [rgb.getpixel((i, 0)) for i in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_32_bit_integer_and_float_modes():
    small = Image.fromarray(np.array([[0, 200]], np.int32))  # mode I, values of an 8-bit image
    assert to_rgb(small).getpixel((1, 0)) == (200, 200, 200)
    f = Image.fromarray(np.array([[0.0, 255.0]], np.float32))
    assert to_rgb(f).getpixel((1, 0)) == (255, 255, 255)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 255))
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (0, 0, 0)
    assert to_rgb(Image.new("LA", (1, 1), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50])
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    rgb = to_rgb(pal)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (200, 100, 50)


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr", "P", "RGB"])
def test_other_modes_become_rgb(mode):
    im = Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).convert(mode)
    assert to_rgb(im).mode == "RGB"


def test_exif_orientation_is_applied(tmp_path):
    im = Image.fromarray(np.zeros((20, 40, 3), np.uint8))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    im.save(tmp_path / "rotated.jpg", exif=exif)
    assert decode_image(tmp_path / "rotated.jpg").size == (20, 40)


# -- decode_image --------------------------------------------------------------------------------------------


def test_decode_from_path_bytes_and_pil(tmp_path):
    path = make_image(tmp_path / "a.png", seed=1)
    from_path = decode_image(path)
    from_str = decode_image(str(path))
    from_bytes = decode_image(path.read_bytes())
    from_pil = decode_image(Image.open(path))
    for im in (from_path, from_str, from_bytes, from_pil):
        assert im.mode == "RGB" and im.size == (40, 40)
        assert np.array_equal(np.asarray(im), np.asarray(from_path))


def test_bad_files_corpus(bad_files):
    for name, path in bad_files.good.items():
        im = decode_image(path, max_pixels=bad_files.max_pixels)
        assert im.mode == "RGB", name
        assert np.isfinite(PRE(im)).all()
    with Image.open(bad_files.good["palette_alpha.png"]) as im:
        assert im.mode == "P" and "transparency" in im.info
    with Image.open(bad_files.good["gray16.png"]) as im:
        assert im.mode == "I;16"
    with Image.open(bad_files.good["cmyk.jpg"]) as im:
        assert im.mode == "CMYK"
    expected = {
        "empty.jpg": "empty file",
        "notes.jpg": "not a recognizable image",
        "truncated.png": "truncated",
        "truncated.jpg": "truncated",
        "too_big.png": "pixel",
    }
    assert set(expected) == set(bad_files.bad)
    for name, path in bad_files.bad.items():
        with pytest.raises(ImageDecodeError) as info:
            decode_image(path, max_pixels=bad_files.max_pixels)
        assert str(path) in str(info.value) and expected[name] in str(info.value), str(info.value)
    assert decode_image(bad_files.bad["too_big.png"]).size == (200, 200)  # fine under the default limit


def test_missing_file_and_bytes_are_named():
    with pytest.raises(ImageDecodeError, match="nowhere.png: cannot read"):
        decode_image("/nowhere.png")
    with pytest.raises(ImageDecodeError, match="<bytes>: empty file"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="<bytes>: corrupt or truncated"):
        data = image_bytes(3, (64, 64), "PNG")
        decode_image(data[: len(data) // 2])


def test_over_limit_under_twice_the_limit_is_refused(tmp_path):
    # Pillow only warns between the limit and twice the limit; probe refuses anyway.
    path = make_image(tmp_path / "big.png", seed=2, size=(120, 100))
    with pytest.raises(ImageDecodeError, match="big.png"):
        decode_image(path, max_pixels=10_000)
    assert decode_image(path, max_pixels=12_000).size == (120, 100)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_header_is_refused_without_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))  # 10^10 pixels claimed in a 57-byte file
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError, match=r"bomb\.png.*exceeds"):
        decode_image(bomb)
    with pytest.raises(ImageDecodeError, match="exceeds"):
        decode_image(bomb.read_bytes())
    assert Image.MAX_IMAGE_PIXELS == before  # the temporary limit is restored
    assert DEFAULT_MAX_PIXELS < 100_000 * 100_000


def test_extreme_aspect_ratio_is_refused_before_resizing(tmp_path):
    from probe.engine import Extractor

    from conftest import TINY, make_image

    long = make_image(tmp_path / "long.png", seed=1, size=(4000, 1))
    ok = make_image(tmp_path / "ok.png", seed=2, size=(40, 30))
    # 4000x1 -> 128000x32 after resizing the short side to 32: 4.1 M pixels, over a 1 M limit the input itself
    # (4000 pixels) is far below.
    fs = Extractor(TINY, tmp_path / "cache", device="cpu", max_pixels=1_000_000).extract([long, ok])
    assert fs.paths == [str(ok)]
    assert len(fs.failures) == 1 and "long.png" in fs.failures[0].error and "aspect ratio" in fs.failures[0].error


def test_engine_batch_normalization_matches_per_image_preprocess_bitwise():
    import torch

    from probe.engine import to_model_input

    pre = Preprocess(resize=24, crop=20, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)) for _ in range(3)]
    per_image = np.stack([pre(im) for im in images])
    crops = torch.from_numpy(np.stack([pre.resize_crop(im) for im in images]))
    for channels_last in (True, False):
        batch = to_model_input(crops, pre, torch.device("cpu"), channels_last)
        assert batch.shape == (3, 3, 20, 20) and batch.dtype == torch.float32
        assert batch.is_contiguous(memory_format=torch.channels_last) == channels_last
        np.testing.assert_array_equal(batch.numpy(), per_image)


# -- reduced-scale JPEG decoding -----------------------------------------------------------------------------

#: The stated tolerance of decode="reduced" vs "exact" (docs/cache-format.md): uint8 crops within a mean absolute
#: difference of 1.5/255, features at cosine >= 0.99. Measured on the detailed JPEGs below (and on 3000x2000
#: photos in benchmarks/bench_photos.py): mean 0.39-0.45, cosine >= 0.995.
MEAN_ABS_TOLERANCE = 1.5
COSINE_TOLERANCE = 0.99


def detailed_image(seed: int, size: tuple[int, int] = (1200, 800)) -> Image.Image:
    """Photo-like detail: colour noise over several octaves, hard-edged rectangles and thin strokes."""
    from PIL import ImageDraw

    w, h = size
    rng = np.random.default_rng(seed)
    acc = np.zeros((h, w, 3), np.float32)
    for cell, amp in ((200, 1.0), (50, 0.6), (12, 0.4), (3, 0.25), (1, 0.1)):
        small = rng.normal(0, 1, (max(2, h // cell), max(2, w // cell), 3)).astype(np.float32)
        acc += amp * np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(small[..., c]), "F").resize(
            (w, h), Image.Resampling.BICUBIC)) for c in range(3)], -1)
    im = Image.fromarray(np.clip(128 + 40 * acc / acc.std(), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(30):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.rectangle([x, y, x + int(rng.integers(10, 200)), y + int(rng.integers(10, 150))],
                       fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    for _ in range(150):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.line([(x, y), (x + int(rng.integers(-60, 60)), y + int(rng.integers(-60, 60)))],
                  fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 5)))
    return im


def detailed_jpeg(path, seed: int, size: tuple[int, int] = (1200, 800), **save_kwargs):
    detailed_image(seed, size).save(path, format="JPEG", quality=90, **save_kwargs)
    return path


EXACT_96 = Preprocess(resize=96, crop=96, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
REDUCED_96 = Preprocess(resize=96, crop=96, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), decode="reduced")


def test_decode_is_part_of_the_identity_and_exact_keeps_its_digest():
    from probe.cache import FeatureSpace

    exact = Preprocess(224, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    reduced = Preprocess(224, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), decode="reduced")
    assert "decode" not in exact.to_dict() and reduced.to_dict()["decode"] == "reduced"
    assert Preprocess.from_dict(reduced.to_dict()) == reduced and Preprocess.from_dict(exact.to_dict()) == exact

    def digest(pre):
        return FeatureSpace(backbone="efficientnet-lite0", weights_sha256="ab" * 32, preprocess=pre.to_dict(),
                            layer="penultimate", pooling="none", dim=1280).digest

    # Golden digests of exact spaces, computed before the decode field existed: they must never change.
    assert digest(exact) == "455c4388881cc4e9c900953cb61b411b3930928cebdfc7303ef708544c2591a6"
    assert digest(Preprocess(256, 224)) == "678695f5f04b9b20c898157e9936db9365d1e67282428570d30da0e8eb64ddfb"
    assert digest(reduced) != digest(exact)
    with pytest.raises(ValueError, match="decode='fast'"):
        Preprocess(224, 224, decode="fast")


def test_reduced_decode_is_within_tolerance_of_exact_on_detailed_jpegs(tmp_path):
    import torch

    from probe.backbones import load_backbone
    from probe.engine import to_model_input

    paths = [detailed_jpeg(tmp_path / f"d{i}.jpg", seed=i) for i in range(3)]
    # 1200x800 -> libjpeg's 1/4 scale (300x200): the smallest with a shorter side >= 2 x 96.
    assert decode_image(paths[0], min_side=REDUCED_96.min_decode_side).size == (300, 200)
    exact = np.stack([EXACT_96.load(p) for p in paths])
    reduced = np.stack([REDUCED_96.load(p) for p in paths])
    diff = np.abs(exact.astype(np.int16) - reduced.astype(np.int16))
    assert diff.max() > 0  # a different path, not the exact one again
    assert diff.mean() <= MEAN_ABS_TOLERANCE, diff.mean()
    bb = load_backbone("test:tiny-cnn")
    feats = []
    for crops in (exact, reduced):
        x = to_model_input(torch.from_numpy(crops), EXACT_96, torch.device("cpu"), False)
        with torch.inference_mode():
            feats.append(bb.features(x).numpy())
    cos = (feats[0] * feats[1]).sum(1) / np.linalg.norm(feats[0], axis=1) / np.linalg.norm(feats[1], axis=1)
    assert cos.min() >= COSINE_TOLERANCE, cos


@pytest.mark.parametrize("suffix", [".png", ".webp", ".bmp", ".tiff", ".gif"])
def test_reduced_decode_leaves_other_formats_bitwise_unchanged(tmp_path, suffix):
    path = tmp_path / f"big{suffix}"
    detailed_image(5, (800, 600)).save(path, **({"lossless": True} if suffix == ".webp" else {}))
    np.testing.assert_array_equal(REDUCED_96.load(path), EXACT_96.load(path))
    assert decode_image(path, min_side=192).size == (800, 600)


def test_reduced_decode_of_a_jpeg_too_small_to_reduce_is_bitwise_exact(tmp_path):
    path = detailed_jpeg(tmp_path / "small.jpg", seed=3, size=(300, 200))  # 200 < 2 x 192: no reduction
    np.testing.assert_array_equal(REDUCED_96.load(path), EXACT_96.load(path))
    im = detailed_image(4)
    np.testing.assert_array_equal(REDUCED_96.load(im), EXACT_96.load(im))  # in-memory images: nothing to decode


def test_reduced_decode_applies_exif_orientation(tmp_path):
    # Stored 1600x800 with the left half dark; orientation 6 displays it 800 wide and 1600 high, dark half on top.
    arr = np.asarray(detailed_image(6, (1600, 800))).copy()
    arr[:, :800] //= 4
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, quality=90, exif=exif)
    shown = decode_image(path, min_side=192)
    assert shown.size == (200, 400)  # reduced to 1/4, then rotated: the shorter side is still >= 192
    assert decode_image(path).size == (800, 1600)
    crop = REDUCED_96.load(path)
    assert crop[:40].mean() < crop[56:].mean() / 2  # the dark half is on top: the rotation was applied
    exact = EXACT_96.load(path)
    assert np.abs(exact.astype(np.int16) - crop.astype(np.int16)).mean() <= MEAN_ABS_TOLERANCE
