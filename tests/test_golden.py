"""Frozen on-disk formats: a cache and a model written by format version 1 are committed under tests/data/golden-v1
(made by tests/data/make_golden.py), and their identities are pinned here as literals.

If one of these tests fails, an on-disk format or the feature-space identity recipe changed. That orphans every
user's cache (or model) silently unless it is deliberate: then bump the format version, keep these fixtures as
the *old* version's fixtures with a test of how the new code treats them, and write new ones.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO_ROOT, TINY
from probe.backbones import load_backbone
from probe.cache import FORMAT, FORMAT_VERSION, FeatureCache
from probe.space import FeatureSpace

GOLDEN = REPO_ROOT / "tests" / "data" / "golden-v1"
SPACE_DIGEST = "10d9ee06f93508f08d1425903b55fd3466d17e03d1c79501694b31735226d7fd"
SPACE_ID = SPACE_DIGEST[:16]
KEYS = {  # image -> sha256 of its bytes (the row key)
    "cat/cat_0.png": "5ec1fa0c4a96ad28fc29050fb4d0ed56f47a78a98f2151876c1bfe0f2b6de714",
    "cat/cat_1.png": "695ff8a75aecb3f34d727e4ac066c2882e5692cec2f7d36967596e29ede5c3f0",
    "dog/dog_0.png": "33dbe19cbbdb68922b22d5feac19e47d301f75852d3c85752672f5d5767be49f",
    "dog/dog_1.png": "0c9647a3c1bcfa23ae3a54c4ffc4b60c83d005bfb1f54c46ce310f0f82b55cf1",
    "fish/fish_0.png": "c223f2a178c5747c5380d0bd9211c9cbc29b234ef90a72b6a5b781ff8f9905b0",
    "fish/fish_1.png": "fe508efabb0b6e84c3db1c043d7f4e3ddb2d22d5304c820cdb11e0ad838824c2",
}
SEGMENT_FEATURES_SHA256 = {  # segment name -> features_sha256 attribute (= sha256 of the stored features)
    "seg-01796036069307421905-32756-22441029015c.h5": "26f8c4fa55a1bdd8c37c7b2d28a80384d644a7ceb31335fe2fa47b5c1cb9f0b6",
    "seg-01796036069485860741-32756-fafea8b6df3a.h5": "cecf19e6e7fdc96524114ce8c548ae3bfea6a2e5895b8e6943e7cde501776f53",
}
SEGMENT_ATTRS = {"created", "features_sha256", "format", "format_version", "keys_sha256", "probe_version", "rows",
                 "space", "space_digest", "torch_version"}
#: Segment attributes that readers may ignore (docs/cache-format.md): added since v1's fixtures without a bump.
OPTIONAL_SEGMENT_ATTRS = {"runtime", "runtime_version", "compacted_from"}
PROBA = [[0.4210, 0.3002, 0.2789], [0.4252, 0.2984, 0.2764], [0.2991, 0.3682, 0.3326],
         [0.2993, 0.3688, 0.3319], [0.2776, 0.3327, 0.3898], [0.2778, 0.3318, 0.3904]]


@pytest.fixture
def golden(tmp_path) -> Path:
    """A copy of the fixtures (reading a cache takes its lock, which would write a lock file into the repo)."""
    shutil.copytree(GOLDEN, tmp_path / "golden")
    return tmp_path / "golden"


def test_feature_space_identity_recipe_is_frozen(golden):
    space_dir = golden / "cache" / "spaces" / SPACE_ID
    described = json.loads((space_dir / "space.json").read_text())
    canonical = json.dumps(described, sort_keys=True, separators=(",", ":"))
    assert hashlib.sha256(canonical.encode()).hexdigest() == SPACE_DIGEST
    assert FeatureSpace.from_dict(described).digest == SPACE_DIGEST
    # ... and today's tiny backbone still describes exactly that space
    assert load_backbone(TINY).feature_space().digest == SPACE_DIGEST
    assert described["format_version"] == FORMAT_VERSION == 1


def test_segment_layout_is_frozen(golden):
    segments = sorted((golden / "cache" / "spaces" / SPACE_ID / "segments").glob("seg-*.h5"))
    assert [p.name for p in segments] == sorted(SEGMENT_FEATURES_SHA256)
    keys = []
    for p in segments:
        with h5py.File(p, "r") as f:
            assert set(f.attrs) == SEGMENT_ATTRS
            assert f.attrs["format"] == FORMAT == "probe.feature-segment" and int(f.attrs["format_version"]) == 1
            assert f.attrs["space_digest"] == SPACE_DIGEST
            assert json.loads(f.attrs["space"]) == json.loads((p.parent.parent / "space.json").read_text())
            assert set(f) == {"keys", "features", "paths"}
            assert f["keys"].dtype == np.dtype("S64") and f["features"].dtype == np.float32
            assert f["features"].shape == (3, 32) and int(f.attrs["rows"]) == 3
            features = f["features"][...]
            assert hashlib.sha256(features.tobytes()).hexdigest() == f.attrs["features_sha256"]
            assert f.attrs["features_sha256"] == SEGMENT_FEATURES_SHA256[p.name]
            assert hashlib.sha256(f["keys"][...].tobytes()).hexdigest() == f.attrs["keys_sha256"]
            keys += [k.decode() for k in f["keys"][...]]
    assert sorted(keys) == sorted(KEYS.values())


def test_todays_reader_reads_the_v1_cache_and_todays_engine_agrees(golden, tmp_path):
    import probe

    for name, key in KEYS.items():  # a row key is the sha256 of the file's bytes
        assert hashlib.sha256((golden / "images" / name).read_bytes()).hexdigest() == key
    (store,) = FeatureCache(golden / "cache").stores()
    assert store.space.digest == SPACE_DIGEST and len(store) == 6 and store.verify().ok
    stored = store.get(list(KEYS.values()))
    store.close()
    opts = dict(device="cpu", workers=0, progress=False)
    cached = probe.extract(golden / "images", TINY, cache=golden / "cache", write=False, **opts)
    assert cached.stats.cached == 6 and cached.stats.new == 0
    fresh = probe.extract(golden / "images", TINY, cache=tmp_path / "fresh", **opts)  # today's engine
    assert fresh.space.digest == SPACE_DIGEST
    np.testing.assert_allclose(fresh.features, stored, rtol=1e-5, atol=1e-6)


def test_the_v1_model_file_loads_and_predicts_the_same(golden):
    import probe

    model = probe.load(golden / "model.probe", check_versions=False)
    assert model.backbone_["space_digest"] == SPACE_DIGEST and list(model.classes_) == ["cat", "dog", "fish"]
    assert model.meta_["format_version"] == 1 and sorted(model.train_keys_) == sorted(KEYS.values())
    fs = probe.extract(golden / "images", TINY, cache=golden / "cache", write=False, device="cpu", progress=False)
    np.testing.assert_allclose(model.predict_proba_features(fs.features), PROBA, atol=1e-4)


def test_a_model_read_by_the_spec_alone(golden):
    """docs/model-format.md ends with a reader that uses only zipfile, json and skops; it must agree with probe."""
    import re

    import probe

    spec = (REPO_ROOT / "docs" / "model-format.md").read_text()
    code = re.findall(r"```python\n(.*?)```", spec, re.S)[-1]
    namespace: dict = {}
    exec(compile(code, "docs/model-format.md", "exec"), namespace)
    manifest, head, train_keys = namespace["read_model"](golden / "model.probe")
    model = probe.load(golden / "model.probe", check_versions=False)
    assert manifest["backbone"] == model.backbone_ and manifest["classes"] == list(model.classes_)
    assert train_keys == model.train_keys_
    X = np.random.default_rng(0).normal(size=(4, 32)).astype(np.float32)
    np.testing.assert_array_equal(head.predict_proba(X), model.head_.predict_proba(X))
    with zipfile.ZipFile(golden / "model.probe") as z:
        assert set(z.namelist()) == {"probe-model.json", "head.skops", "train-keys.txt"}


def _layout(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {"attrs": sorted(f.attrs), "format": f.attrs["format"], "version": int(f.attrs["format_version"]),
                "datasets": {name: (str(ds.dtype), ds.shape[1:], ds.compression, ds.chunks is None)
                             for name, ds in f.items()}}


def test_todays_writer_writes_the_v1_layout(golden, tmp_path):
    import probe

    probe.extract(golden / "images", TINY, cache=tmp_path / "now", device="cpu", progress=False, segment_rows=3)
    written = sorted((tmp_path / "now" / "spaces" / SPACE_ID / "segments").glob("seg-*.h5"))
    reference = sorted((golden / "cache" / "spaces" / SPACE_ID / "segments").glob("seg-*.h5"))
    assert len(written) == 2
    golden = _layout(reference[0])
    for p in written:
        now = _layout(p)
        # Optional attributes (docs/cache-format.md) may be added without a version bump; nothing may go away.
        assert set(golden["attrs"]) <= set(now["attrs"]) <= set(golden["attrs"]) | OPTIONAL_SEGMENT_ATTRS
        assert {k: v for k, v in now.items() if k != "attrs"} == {k: v for k, v in golden.items() if k != "attrs"}
