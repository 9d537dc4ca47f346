"""The composed model: sklearn surface, save/load round trip, compatibility checks, safe loading."""

from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import pytest
from conftest import TINY, make_image_folder
from PIL import Image

import probe
from probe.errors import ModelCompatibilityError, ProbeError, UntrustedModelError
from probe.model import MANIFEST, load


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    train = make_image_folder(root / "train", per_class=10)
    test = make_image_folder(root / "test", per_class=4, seed=700)
    res = probe.fit(train, backbone=TINY, cache=root / "cache", batch_size=8, output=root / "m" / "model.probe")
    return res, test, root


def _paths(folder):
    return sorted(str(p) for p in folder.rglob("*.png"))


def _rewrite(src, dst, manifest_update=None, replace=None):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == MANIFEST and manifest_update:
                m = json.loads(data)
                manifest_update(m)
                data = json.dumps(m).encode()
            if replace and name in replace:
                data = replace[name]
            zout.writestr(name, data)
        for name, data in (replace or {}).items():
            if name not in zin.namelist():
                zout.writestr(name, data)
    return dst


def test_save_load_predict_gives_identical_probabilities(fitted):
    res, test, root = fitted
    paths = _paths(test)
    before = res.model.predict_proba(paths)
    loaded = load(res.path)
    after = loaded.predict_proba(paths)
    np.testing.assert_array_equal(before, after)
    assert list(loaded.classes_) == list(res.model.classes_)
    assert loaded.score(paths, [p.split("/")[-2] for p in paths]) >= 0.9
    assert loaded.meta_["training"]["keys_digest"] == res.model.meta_["training"]["keys_digest"]


def test_predicts_on_pil_images_like_on_files(fitted):
    res, test, _ = fitted
    paths = _paths(test)[:5]
    images = [Image.open(p) for p in paths]
    np.testing.assert_allclose(res.model.predict_proba(images), res.model.predict_proba(paths), atol=1e-6)
    assert list(res.model.predict(images)) == list(res.model.predict(paths))


def test_manifest_records_lineage(fitted):
    res, _, _ = fitted
    with zipfile.ZipFile(res.path) as z:
        m = json.loads(z.read(MANIFEST))
    bb = m["backbone"]
    assert bb["name"] == TINY and len(bb["weights_sha256"]) == 64 and bb["preprocess"]["crop"] == 32
    assert bb["layer"] == "penultimate" and len(bb["space_digest"]) == 64
    assert m["head"]["name"] == "logreg" and "chosen" in m["head"]
    assert {"probe", "sklearn", "torch"} <= set(m["versions"])
    assert m["training"]["n_inputs"] == 30 and len(m["training"]["keys_digest"]) == 64
    assert "accuracy" in m["metrics"] and m["created"]
    assert m["head_file"] == "head.skops"


def test_weights_digest_mismatch_is_refused(fitted, tmp_path):
    res, test, _ = fitted

    def bump(m):
        m["backbone"]["weights_sha256"] = "0" * 64

    bad = load(_rewrite(res.path, tmp_path / "other-weights.probe", bump))
    with pytest.raises(ModelCompatibilityError, match="weights sha256"):
        bad.predict(_paths(test)[:2])


def test_model_moves_to_a_machine_where_the_weights_live_elsewhere(fitted, tmp_path):
    res, test, _ = fitted

    def elsewhere(m):
        m["backbone"]["weights_path"] = "/training/machine/site-packages/weights.pth"

    moved = load(_rewrite(res.path, tmp_path / "moved.probe", elsewhere))
    paths = _paths(test)[:4]
    np.testing.assert_array_equal(moved.predict_proba(paths), res.model.predict_proba(paths))


def test_unknown_backbone_and_other_sklearn_are_refused(fitted, tmp_path):
    res, test, _ = fitted

    def rename(m):
        m["backbone"]["name"] = "tv:resnet19"

    with pytest.raises(ModelCompatibilityError, match="resnet19"):
        load(_rewrite(res.path, tmp_path / "a.probe", rename))

    def old_sklearn(m):
        m["versions"]["sklearn"] = "0.24.2"

    path = _rewrite(res.path, tmp_path / "b.probe", old_sklearn)
    with pytest.raises(ModelCompatibilityError, match="scikit-learn 0.24.2"):
        load(path)
    overridden = load(path, check_versions=False)
    assert list(overridden.classes_) == list(res.model.classes_)
    paths = _paths(test)
    np.testing.assert_array_equal(overridden.predict_proba(paths), res.model.predict_proba(paths))


class _Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['PROBE_PWNED']).write_text('x')",))


def test_pickled_head_does_not_run_code_without_trust(fitted, tmp_path, monkeypatch):
    res, _, _ = fitted
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PROBE_PWNED", str(marker))

    def to_joblib(m):
        m["head_file"] = "head.joblib"

    path = _rewrite(res.path, tmp_path / "evil.probe", to_joblib, {"head.joblib": pickle.dumps(_Boom())})
    with pytest.raises(UntrustedModelError, match="arbitrary code"):
        load(path)
    assert not marker.exists()


def test_skops_head_with_untrusted_type_is_refused(fitted, tmp_path):
    import os

    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    res, _, _ = fitted
    evil = sio.dumps(FunctionTransformer(func=os.system))  # a callable skops would look up and call
    path = _rewrite(res.path, tmp_path / "evil2.probe", replace={"head.skops": evil})
    with pytest.raises(UntrustedModelError, match="does not trust"):
        load(path)


def test_not_a_model_file(tmp_path):
    p = tmp_path / "x.probe"
    p.write_text("hello")
    with pytest.raises(ProbeError, match="not a probe model file"):
        load(p)
    with pytest.raises(ProbeError, match="no such model file"):
        load(tmp_path / "missing.probe")


@pytest.mark.parametrize("field, value, message", [
    ("precision", "bfloat16", "precision=bfloat16"),
    ("space_digest", "ab" * 32, "feature space abababababababab"),
])
def test_recorded_precision_and_feature_space_are_checked(fitted, tmp_path, field, value, message):
    res, test, _ = fitted

    def edit(m):
        m["backbone"][field] = value

    model = load(_rewrite(res.path, tmp_path / "edited.probe", edit))
    with pytest.raises(ModelCompatibilityError, match=message):
        model.predict_proba(_paths(test)[:2])


def test_probe_model_is_a_real_estimator_on_raw_inputs(tmp_path):
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError
    from sklearn.model_selection import cross_val_score
    from sklearn.utils.validation import check_is_fitted

    from probe import engine
    from probe.model import ProbeModel

    train = make_image_folder(tmp_path / "train", per_class=8)
    paths = _paths(train)
    y = [p.split("/")[-2] for p in paths]
    est = ProbeModel(backbone=TINY, head="logreg", cache=tmp_path / "cache", value=1.0,
                     options={"batch_size": 8, "device": "cpu"})
    with pytest.raises(NotFittedError):
        check_is_fitted(est)
    with pytest.raises(NotFittedError):
        est.predict(paths[:1])
    assert est.fit(paths, y) is est
    check_is_fitted(est)
    assert list(est.classes_) == ["cat", "dog", "fish"] and est.score(paths, y) >= 0.9
    assert est.backbone == TINY and est.backbone_["name"] == TINY and len(est.train_keys_) == 24

    unfitted = clone(est)
    assert unfitted.get_params() == est.get_params()
    with pytest.raises(NotFittedError):
        check_is_fitted(unfitted)
    loaded_clone = clone(load(est.save(tmp_path / "m.probe")))
    with pytest.raises(NotFittedError):
        check_is_fitted(loaded_clone)

    batches = []
    run_model = engine.Extractor._run_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine.Extractor, "_run_model",
                   lambda self, todo, *a, **k: batches.append(len(todo)) or run_model(self, todo, *a, **k))
        scores = cross_val_score(unfitted, paths, y, cv=3)  # through the cache: nothing new to extract
    assert batches == [] and scores.mean() >= 0.8
