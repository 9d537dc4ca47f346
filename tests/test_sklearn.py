"""FeatureExtractor inside scikit-learn: clone, params, Pipeline, GridSearchCV over head parameters."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from conftest import TINY, make_image_folder
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

from probe.errors import StrictModeError
from probe.sklearn import FeatureExtractor


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("sk") / "imgs", per_class=8)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    return paths, [p.split("/")[-2] for p in paths]


def test_clone_and_params_roundtrip():
    fe = FeatureExtractor(TINY, batch_size=4, cache="somewhere")
    c = clone(fe)
    assert c is not fe and c.get_params() == fe.get_params()
    c.set_params(batch_size=2)
    assert c.batch_size == 2 and fe.batch_size == 4


def test_transform_matches_batches_and_pickles(data):
    paths, _ = data
    fe = FeatureExtractor(TINY, batch_size=4)
    X = fe.fit_transform(paths)
    assert X.shape == (len(paths), 32) and X.dtype == np.float32
    again = pickle.loads(pickle.dumps(fe)).transform(paths)
    np.testing.assert_allclose(X, again, atol=1e-5)
    assert len(fe.get_feature_names_out()) == 32


def test_pipeline_fits_and_predicts(data):
    paths, y = data
    pipe = Pipeline([("features", FeatureExtractor(TINY)), ("head", LogisticRegression(max_iter=500))])
    pipe.fit(paths[::2], y[::2])
    assert (pipe.predict(paths[1::2]) == np.array(y[1::2])).mean() >= 0.9


def test_grid_search_over_head_params_extracts_once(data, tmp_path, monkeypatch):
    from probe import engine

    paths, y = data
    computed = []  # rows the model computed, over every clone the search makes
    run_model = engine.Extractor._run_model

    def counting(self, todo, *args, **kwargs):
        computed.extend(todo)
        return run_model(self, todo, *args, **kwargs)

    monkeypatch.setattr(engine.Extractor, "_run_model", counting)
    fe = FeatureExtractor(TINY, cache=tmp_path / "c", batch_size=4)  # the cache starts empty
    pipe = Pipeline([("features", fe), ("head", LogisticRegression(max_iter=500))])
    gs = GridSearchCV(pipe, {"head__C": [0.01, 0.1, 1.0]}, cv=3).fit(paths, y)  # 9 fits + the refit
    assert gs.best_params_["head__C"] in (0.01, 0.1, 1.0)
    assert len(computed) == len(paths)  # each image through the backbone exactly once


def test_undecodable_input_raises(tmp_path, data):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(StrictModeError, match="bad.png"):
        FeatureExtractor(TINY).transform([data[0][0], str(bad)])


def test_parameters_are_exactly_the_extraction_options():
    from probe.options import ExtractOptions

    fe = FeatureExtractor(TINY, batch_size=3, cache="somewhere")
    assert set(fe.get_params()) == set(ExtractOptions.names())
    opts = fe.options()
    assert (opts.backbone, opts.batch_size, opts.cache) == (TINY, 3, "somewhere")


def test_bad_parameters_fail_before_anything_is_loaded(tmp_path):
    from probe.errors import ProbeError

    with pytest.raises(ProbeError, match="batch_size=0"):
        FeatureExtractor(TINY, batch_size=0, cache=tmp_path / "c").transform(["x.png"])
    assert not (tmp_path / "c").exists()
