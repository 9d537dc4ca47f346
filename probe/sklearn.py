"""scikit-learn integration: the frozen backbone as a stateless transformer.

    from sklearn.pipeline import Pipeline
    from sklearn.linear_model import LogisticRegression
    from probe.sklearn import FeatureExtractor

    pipe = Pipeline([("features", FeatureExtractor("efficientnet-lite0", cache="cache")),
                     ("head", LogisticRegression(max_iter=1000))])
    pipe.fit(paths, labels).predict(new_paths)

``FeatureExtractor`` maps a sequence of image paths or PIL images to a float32 (n, dim) matrix. It is stateless
(``fit`` learns nothing), so ``clone``, ``get_params``/``set_params`` and grid searches work; with ``cache=DIR``
features are read from (and, with ``write=True``, written to) probe's feature cache, so a grid search over the
head pays for extraction once.

sklearn's ``check_estimator`` checks that cannot apply: those feeding numeric arrays (the inputs are images, not
feature vectors), and the ``n_features_in_`` checks (there is no fixed input width).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from .defaults import DEFAULT_BACKBONE, DEFAULT_MAX_PIXELS
from .options import ExtractOptions


class FeatureExtractor(TransformerMixin, BaseEstimator):
    """Stateless transformer: paths / PIL images -> features of a frozen backbone.

    Its parameters are exactly the fields of :class:`~probe.options.ExtractOptions` (scikit-learn needs them
    spelled out in ``__init__`` for ``get_params`` / ``clone``; a test keeps the two lists identical), except that
    ``cache`` defaults to None (no cache) and ``progress`` to False here.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, *, weights=None, layer=None, pooling=None,
                 dtype: str = "float32", decode=None, amp="auto", device=None, batch_size=None, workers=None,
                 threads=None, cache=None, write: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                 segment_rows: int = 1024, progress: bool = False, runtime: str = "auto"):
        self.backbone = backbone
        self.weights = weights
        self.layer = layer
        self.pooling = pooling
        self.dtype = dtype
        self.decode = decode
        self.threads = threads
        self.cache = cache
        self.write = write
        self.device = device
        self.amp = amp
        self.batch_size = batch_size
        self.workers = workers
        self.max_pixels = max_pixels
        self.segment_rows = segment_rows
        self.progress = progress
        self.runtime = runtime

    def options(self) -> ExtractOptions:
        return ExtractOptions(**self.get_params())

    def extractor(self):
        """The underlying Extractor (backbone loaded once per parameter setting)."""
        from .engine import Extractor

        options = self.options()
        if getattr(self, "_extractor_cache", (None,))[0] != options:
            self._extractor_cache = (options, Extractor(options))
        return self._extractor_cache[1]

    def fit(self, X=None, y=None):
        return self

    def transform(self, X) -> np.ndarray:
        """Features of every input, in order; an undecodable input raises (StrictModeError) naming it."""
        return self.extractor().extract(list(X), strict=True).features

    def get_feature_names_out(self, input_features=None):
        dim = self.extractor().space.dim
        return np.asarray([f"feature{i}" for i in range(dim)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_extractor_cache", None)  # the loaded torch module is rebuilt on demand
        return state
