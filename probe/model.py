"""The composed model: backbone reference + preprocess + fitted scikit-learn head, predicting on raw inputs.

A ``.probe`` file is a zip archive (written atomically):

    probe-model.json   format, format_version, backbone (name, weights sha256, layer, pooling, preprocess, dim),
                       feature space digest, head (type, params, chosen regularization), classes, training lineage
                       (digest of training keys + labels, counts), metrics, library versions, creation time
    head.skops         the head, stored with skops (no pickle: loading cannot run arbitrary code)
    train-keys.txt     the training inputs' cache keys (for leakage checks on evaluation data)
    train-set.json     optional: {"keys": [...], "labels": [...]}, every training row's key and label (so a refit
                       can reuse the old training set from the feature cache); files without it still load

``load`` also takes a registry reference (``NAME``, ``NAME@champion``, ``NAME@3``; see probe/registry.py).

Heads skops cannot store are written with joblib as ``head.joblib`` and load only with ``trust=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import time
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import sklearn
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from .errors import ModelCompatibilityError, ProbeError, UntrustedModelError
from .files import atomic_path
from .heads import SKOPS_TRUSTED_TYPES

log = logging.getLogger(__name__)

FORMAT = "probe.model"
FORMAT_VERSION = 1
MANIFEST = "probe-model.json"
TRAIN_SET = "train-set.json"

#: skops marks some sklearn-internal types in probe's built-in heads as untrusted (calibrated linear-svm / ridge,
#: the mlp's optimizer); they are plain data holders, so they load without --trust. Anything else needs trust.
ALLOWED_TYPES = frozenset(SKOPS_TRUSTED_TYPES)


def keys_digest(keys: Sequence[str], labels: Sequence) -> str:
    """Order-independent digest of a training set: sha256 over sorted ``key<TAB>label`` lines."""
    h = hashlib.sha256()
    for line in sorted(f"{k}\t{lab}" for k, lab in zip(keys, labels)):
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


def _versions() -> dict:
    from . import __version__

    out = {"probe": __version__, "sklearn": sklearn.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    try:
        import torch

        out["torch"] = str(torch.__version__)
    except ImportError:  # pragma: no cover
        pass
    return out


class ProbeModel(ClassifierMixin, BaseEstimator):
    """A fitted probe: predicts on raw inputs (paths, PIL images) like a scikit-learn classifier.

    Equivalent to ``Pipeline([("features", FeatureExtractor(...)), ("head", head)])``; ``head`` is the fitted
    scikit-learn pipeline and can be used on cached features directly (``predict_proba_features``).
    """

    def __init__(self, backbone: dict | None = None, head=None, meta: dict | None = None, train_keys=None):
        self.backbone = backbone
        self.head = head
        self.meta = meta
        self.train_keys = train_keys

    #: (keys, labels) of every training row, in training order, when known (not a constructor parameter:
    #: sklearn's get_params/clone leave it alone). Saved as train-set.json.
    train_set: tuple[list[str], list[str]] | None = None

    # -- sklearn surface ---------------------------------------------------------------------------------

    @property
    def classes_(self) -> np.ndarray:
        check_is_fitted(self.head)
        return self.head.classes_

    def __sklearn_is_fitted__(self) -> bool:
        return self.head is not None

    def fit(self, X, y):
        raise ProbeError("ProbeModel is built by probe.fit(...) on cached features; refit with `probe fit`")

    def extractor(self, cache="cache", write: bool = False, **options):
        """An :class:`~probe.extract.Extractor` for this model's feature space (built once, then reused)."""
        from .sklearn import FeatureExtractor

        key = (str(cache), write, tuple(sorted(options.items())))
        cached = getattr(self, "_extractor", None)
        if cached is None or cached[0] != key:
            # The recorded weights file is where it was on the training machine; elsewhere the registry's own
            # lookup finds the weights, and check_backbone refuses them unless their sha256 matches.
            weights = self.backbone.get("weights_path")
            if weights and not os.path.isfile(weights):
                weights = None
            fe = FeatureExtractor(
                backbone=self.backbone["name"], weights=weights,
                layer=self.backbone["layer"], pooling=self.backbone["pooling"], dtype=self.backbone["dtype"],
                cache=cache, write=write, **options,
            )
            ex = fe.extractor()
            self.check_backbone(ex.backbone)
            self._extractor = (key, ex)
        return self._extractor[1]

    def check_backbone(self, backbone) -> None:
        """Refuse a backbone whose weights, preprocess or output differ from the ones the head was trained on."""
        rec = self.backbone
        if backbone.weights_sha256 != rec["weights_sha256"]:
            raise ModelCompatibilityError(
                f"model was trained on {rec['name']} weights sha256 {rec['weights_sha256'][:16]}..., but the loaded "
                f"weights have sha256 {backbone.weights_sha256[:16]}...; pass the original file with --weights PATH"
            )
        if backbone.preprocess.to_dict() != rec["preprocess"]:
            raise ModelCompatibilityError(f"{rec['name']}: installed preprocess differs from the model's")
        if backbone.dim != rec["dim"]:
            raise ModelCompatibilityError(f"{rec['name']}: backbone gives {backbone.dim}-d features, head expects {rec['dim']}")

    def features(self, X, cache="cache", write: bool = False, strict: bool = True, **options):
        """FeatureSet of raw inputs (reusing cached rows); ``strict`` raises if any input fails to decode."""
        return self.extractor(cache, write, **options).extract(list(X), strict=strict)

    def predict_proba(self, X) -> np.ndarray:
        return self.predict_proba_features(self.features(X).features)

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def predict_proba_features(self, F: np.ndarray) -> np.ndarray:
        if not hasattr(self.head, "predict_proba"):
            raise ProbeError(f"head {type(self.head).__name__} has no predict_proba")
        return self.head.predict_proba(np.asarray(F, dtype=np.float32))

    # -- persistence -------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as one zip file, atomically."""
        import skops.io as sio

        path = Path(path)
        manifest = dict(self.meta or {})
        manifest.update({"format": FORMAT, "format_version": FORMAT_VERSION, "backbone": self.backbone,
                         "classes": [str(c) for c in self.classes_]})
        manifest.setdefault("versions", _versions())
        manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        try:
            head_bytes, head_name = sio.dumps(self.head), "head.skops"
        except Exception as e:  # skops cannot represent some third-party objects
            import joblib

            log.warning("head cannot be stored with skops (%s); storing with joblib, loading will need --trust", e)
            buf = io.BytesIO()
            joblib.dump(self.head, buf)
            head_bytes, head_name = buf.getvalue(), "head.joblib"
        manifest["head_file"] = head_name
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=json_default))
            z.writestr(head_name, head_bytes)
            if self.train_keys is not None:
                z.writestr("train-keys.txt", "\n".join(self.train_keys))
            train_set = getattr(self, "train_set", None)
            if train_set is not None:
                z.writestr(TRAIN_SET, json.dumps({"keys": list(train_set[0]),
                                                  "labels": [str(v) for v in train_set[1]]}))
        return path


def json_default(o):
    """``json.dumps(default=...)`` for numpy scalars and arrays (anything else becomes its str)."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            manifest = json.loads(z.read(MANIFEST))
    except FileNotFoundError as e:
        raise ProbeError(f"{path}: no such model file") from e
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as e:
        raise ProbeError(f"{path}: not a probe model file ({e})") from e
    if manifest.get("format") != FORMAT:
        raise ProbeError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if int(manifest.get("format_version", -1)) > FORMAT_VERSION:
        raise ModelCompatibilityError(
            f"{path}: model format_version {manifest['format_version']} is newer than this probe ({FORMAT_VERSION})"
        )
    return manifest


def load(path: str | os.PathLike, *, trust: bool = False, check_versions: bool = True) -> ProbeModel:
    """Load a ``.probe`` file (or a registry reference ``NAME@REF``) without executing code from it (unless
    ``trust=True``).

    Refuses (ModelCompatibilityError) an unknown backbone and a scikit-learn major.minor other than the one the
    head was saved with (``check_versions=False`` overrides). Weights are checked against the recorded sha256
    when the backbone is first used.
    """
    if isinstance(path, str):
        from .registry import is_model_ref, load_model

        if is_model_ref(path):  # NAME, NAME@champion, NAME@3: the registry (env PROBE_REGISTRY or models/)
            return load_model(path, trust=trust, check_versions=check_versions)
    import skops.io as sio

    from .backbones import get_spec

    path = Path(path)
    manifest = read_manifest(path)
    backbone = manifest["backbone"]
    try:
        get_spec(backbone["name"])
    except ProbeError as e:
        raise ModelCompatibilityError(f"{path}: {e}") from e
    saved = manifest.get("versions", {}).get("sklearn", "")
    if check_versions and saved.split(".")[:2] != sklearn.__version__.split(".")[:2]:
        raise ModelCompatibilityError(
            f"{path}: head saved with scikit-learn {saved}, this is {sklearn.__version__}; "
            "install the same scikit-learn or load with check_versions=False (--ignore-versions)"
        )
    head_name = manifest.get("head_file", "head.skops")
    with zipfile.ZipFile(path) as z:
        head_bytes = z.read(head_name)
        names = set(z.namelist())
        train_keys = z.read("train-keys.txt").decode().split("\n") if "train-keys.txt" in names else None
        train_set = json.loads(z.read(TRAIN_SET)) if TRAIN_SET in names else None
    if head_name.endswith(".joblib"):
        if not trust:
            raise UntrustedModelError(
                f"{path}: the head is a pickle (joblib), which can run arbitrary code when loaded; "
                "load it only if you trust its origin, with trust=True (--trust)"
            )
        import joblib

        head = joblib.load(io.BytesIO(head_bytes))
    else:
        try:
            untrusted = sio.get_untrusted_types(data=head_bytes)
        except Exception as e:
            raise ProbeError(f"{path}: unreadable head ({e})") from e
        unknown = [t for t in untrusted if t not in ALLOWED_TYPES]
        if unknown and not trust:
            raise UntrustedModelError(
                f"{path}: the head contains types probe does not trust by default: {', '.join(unknown)}; "
                "load with trust=True (--trust) only if you trust its origin"
            )
        try:
            head = sio.loads(head_bytes, trusted=list(untrusted))
        except Exception as e:
            raise ProbeError(f"{path}: unreadable head ({e})") from e
    meta = {k: v for k, v in manifest.items() if k not in ("backbone",)}
    model = ProbeModel(backbone=backbone, head=head, meta=meta, train_keys=train_keys)
    if train_set is not None:
        model.train_set = (list(train_set["keys"]), list(train_set["labels"]))
    return model
