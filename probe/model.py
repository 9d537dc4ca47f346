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

from .defaults import DEFAULT_BACKBONE, DEFAULT_CACHE
from .errors import ModelCompatibilityError, ProbeError, UntrustedModelError
from .files import atomic_path
from .heads import SKOPS_TRUSTED_TYPES
from .jsonable import json_default
from .manifest import MANIFEST, ModelFormatError, check_manifest, read_member
from .options import ExtractOptions

log = logging.getLogger(__name__)

FORMAT = "probe.model"
FORMAT_VERSION = 1
TRAIN_SET = "train-set.json"

#: skops marks some sklearn-internal types in probe's built-in heads as untrusted (calibrated linear-svm / ridge,
#: the mlp's optimizer); they are plain data holders, so they load without --trust. Anything else needs trust.
ALLOWED_TYPES = frozenset(SKOPS_TRUSTED_TYPES)
TRAIN_KEYS = "train-keys.txt"


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
    """A probe on raw inputs (paths, PIL images): a frozen backbone's features and a scikit-learn head.

    A scikit-learn estimator: ``ProbeModel(backbone="efficientnet-lite0", head="logreg", cache="cache")
    .fit(paths, y)`` extracts features through the cache (only misses reach the model) and fits the head with the
    regularization sweep (:func:`probe.training.fit`); ``clone`` gives an unfitted copy; ``predict``,
    ``predict_proba``, ``score`` and ``classes_`` work once fitted, and :func:`load` returns a fitted one.

    Parameters are the backbone (and its ``weights`` / ``layer`` / ``pooling`` / ``dtype``), the head (a name from
    :mod:`probe.heads` or an import path, with ``params``, ``standardize``, ``l2_normalize``), the sweep's
    ``val_split`` / ``value`` / ``seed``, the feature ``cache`` and ``options``: further
    :class:`~probe.options.ExtractOptions` fields (device, batch_size, ...) as a dict.

    Learned state: ``backbone_`` (the feature space record, as saved), ``head_`` (the fitted scikit-learn
    pipeline, usable on cached features via :meth:`predict_proba_features`), ``meta_`` (lineage, metrics, head
    description), ``train_keys_`` (the training inputs' cache keys) and ``train_set_`` ((keys, labels) of every
    training row, when known: what a gated refit reuses from the cache).
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, head: str = "logreg", *, cache=DEFAULT_CACHE,
                 weights=None, layer=None, pooling=None, dtype: str = "float32", params: dict | None = None,
                 standardize: bool = False, l2_normalize: bool = False, val_split: float = 0.1, value=None,
                 seed: int = 0, options: dict | None = None):
        self.backbone = backbone
        self.head = head
        self.cache = cache
        self.weights = weights
        self.layer = layer
        self.pooling = pooling
        self.dtype = dtype
        self.params = params
        self.standardize = standardize
        self.l2_normalize = l2_normalize
        self.val_split = val_split
        self.value = value
        self.seed = seed
        self.options = options

    @classmethod
    def fitted(cls, backbone: dict, head, meta: dict | None = None, train_keys=None, train_set=None,
               **params) -> "ProbeModel":
        """A fitted model from its learned state (what :func:`load` and :func:`probe.training.fit` build)."""
        model = cls(backbone=backbone["name"], head=(meta or {}).get("head", {}).get("name", "logreg"),
                    weights=backbone.get("weights_path"), layer=backbone.get("layer"), pooling=backbone.get("pooling"),
                    dtype=backbone.get("dtype", "float32"), **params)
        model.backbone_, model.head_, model.meta_, model.train_keys_ = backbone, head, dict(meta or {}), train_keys
        model.train_set_ = train_set
        return model

    # -- sklearn surface ---------------------------------------------------------------------------------

    @property
    def classes_(self) -> np.ndarray:
        check_is_fitted(self)
        return self.head_.classes_

    def __sklearn_is_fitted__(self) -> bool:
        return getattr(self, "head_", None) is not None

    def fit(self, X, y, **fit_options) -> "ProbeModel":
        """Extract features of the inputs ``X`` (paths or PIL images; cached rows are reused) and fit the head on
        labels ``y`` with the sweep. ``fit_options`` go to :func:`probe.training.fit` (``val``, ``strict``,
        ``extract_missing``, ``output``). Returns self."""
        from .sources import Record
        from .training import fit as fit_probe

        X, y = list(X), list(y)
        if len(X) != len(y):
            raise ProbeError(f"X has {len(X)} inputs but y has {len(y)} labels")
        records = [Record(x if hasattr(x, "mode") and hasattr(x, "size") else str(x), label) for x, label in zip(X, y)]
        opts = dict(self.options or {})
        res = fit_probe(records, self.head, backbone=self.backbone, cache=self.cache, weights=self.weights,
                        layer=self.layer, pooling=self.pooling, dtype=self.dtype, params=self.params,
                        standardize=self.standardize, l2_normalize=self.l2_normalize, val_split=self.val_split,
                        value=self.value, seed=self.seed, **opts, **fit_options)
        m = res.model
        self.backbone_, self.head_, self.meta_, self.train_keys_ = m.backbone_, m.head_, m.meta_, m.train_keys_
        self.train_set_ = m.train_set_
        self.fit_result_ = res
        self.__dict__.pop("_extractor", None)
        return self

    def extract_options(self, cache=DEFAULT_CACHE, write: bool = False, **options) -> ExtractOptions:
        """The extraction options that reproduce this model's feature space (plus speed / storage ``options``)."""
        check_is_fitted(self)
        # The recorded weights file is where it was on the training machine; elsewhere the registry's own
        # lookup finds the weights, and check_backbone refuses them unless their sha256 matches.
        rec = self.backbone_
        weights = rec.get("weights_path")
        if weights and not os.path.isfile(weights):
            weights = None
        # Decode as the training features were (a model saved before the field existed decoded exactly).
        decode = rec["preprocess"].get("decode", "exact")
        return ExtractOptions.from_kwargs(
            backbone=rec["name"], weights=weights, layer=rec["layer"], pooling=rec["pooling"], dtype=rec["dtype"],
            decode=decode, cache=cache, write=write, **{**(self.options or {}), **options})

    def extractor(self, cache=DEFAULT_CACHE, write: bool = False, **options):
        """An :class:`~probe.engine.Extractor` for this model's feature space (built once, then reused)."""
        from .engine import Extractor

        opts = self.extract_options(cache, write, **options)
        cached = getattr(self, "_extractor", None)
        if cached is None or cached[0] != opts:
            ex = Extractor(opts)
            self.check_backbone(ex.backbone, ex.space)
            self._extractor = (opts, ex)
        return self._extractor[1]

    def check_backbone(self, backbone, space=None) -> None:
        """Refuse a backbone whose weights, preprocess, output or feature space differ from the ones the head was
        trained on (ModelCompatibilityError naming the field)."""
        rec = self.backbone_
        if space is not None:
            if space.precision != rec.get("precision", space.precision):
                raise ModelCompatibilityError(
                    f"model was trained on features computed in precision={rec['precision']}, but this run computes "
                    f"precision={space.precision}; pass --amp to match (e.g. --amp off for float32)")
            recorded = rec.get("space_digest")
            if recorded and space.digest != recorded:
                name = _space_difference(rec, space)
                raise ModelCompatibilityError(
                    f"model was trained in feature space {recorded[:16]}, this run gives {space.id} "
                    f"(field {name!r} differs); features would not mean what the head learned")
        if backbone.weights_sha256 != rec["weights_sha256"]:
            raise ModelCompatibilityError(
                f"model was trained on {rec['name']} weights sha256 {rec['weights_sha256'][:16]}..., but the loaded "
                f"weights have sha256 {backbone.weights_sha256[:16]}...; pass the original file with --weights PATH"
            )
        if backbone.preprocess.to_dict() != rec["preprocess"]:
            raise ModelCompatibilityError(f"{rec['name']}: installed preprocess differs from the model's")
        if backbone.dim != rec["dim"]:
            raise ModelCompatibilityError(f"{rec['name']}: backbone gives {backbone.dim}-d features, head expects {rec['dim']}")

    def features(self, X, cache=None, write: bool = False, strict: bool = True, **options):
        """FeatureSet of raw inputs (reusing cached rows); ``strict`` raises if any input fails to decode."""
        cache = self.cache if cache is None else cache
        return self.extractor(cache, write, **options).extract(list(X), strict=strict)

    def predict_proba(self, X) -> np.ndarray:
        return self.predict_proba_features(self.features(X).features)

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def predict_proba_features(self, F: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        if not hasattr(self.head_, "predict_proba"):
            raise ProbeError(f"head {type(self.head_).__name__} has no predict_proba")
        return self.head_.predict_proba(np.asarray(F, dtype=np.float32))

    # -- persistence -------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as one zip file, atomically."""
        import skops.io as sio

        path = Path(path)
        check_is_fitted(self)
        manifest = dict(self.meta_ or {})
        manifest.update({"format": FORMAT, "format_version": FORMAT_VERSION, "backbone": self.backbone_,
                         "classes": [str(c) for c in self.classes_]})
        manifest.setdefault("versions", _versions())
        manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        try:
            head_bytes, head_name = sio.dumps(self.head_), "head.skops"
        except Exception as e:  # skops cannot represent some third-party objects
            import joblib

            log.warning("head cannot be stored with skops (%s); storing with joblib, loading will need --trust", e)
            buf = io.BytesIO()
            joblib.dump(self.head_, buf)
            head_bytes, head_name = buf.getvalue(), "head.joblib"
        manifest["head_file"] = head_name
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=json_default))
            z.writestr(head_name, head_bytes)
            if self.train_keys_ is not None:
                z.writestr(TRAIN_KEYS, "\n".join(self.train_keys_))
            train_set = getattr(self, "train_set_", None)
            if train_set is not None:
                z.writestr(TRAIN_SET, json.dumps({"keys": list(train_set[0]),
                                                  "labels": [str(v) for v in train_set[1]]}))
        return path


def read_manifest(path: str | os.PathLike) -> dict:
    """The validated manifest of a ``.probe`` file (sizes bounded before reading; every field checked)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            return check_manifest(z, path, FORMAT, FORMAT_VERSION)
    except FileNotFoundError as e:
        raise ProbeError(f"{path}: no such model file") from e
    except IsADirectoryError as e:
        raise ProbeError(f"{path}: is a folder, not a model file") from e
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise ProbeError(f"{path}: not a probe model file ({e})") from e


def _space_difference(record: dict, space) -> str:
    for name in ("weights_sha256", "preprocess", "layer", "pooling", "dim", "dtype", "precision"):
        if record.get(name) != getattr(space, name):
            return name
    return "format_version"


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
    head_name = manifest["head_file"]
    with zipfile.ZipFile(path) as z:
        head_bytes = read_member(z, path, head_name)
        names = set(z.namelist())
        keys_bytes = read_member(z, path, TRAIN_KEYS) if TRAIN_KEYS in names else None
        set_bytes = read_member(z, path, TRAIN_SET) if TRAIN_SET in names else None
    train_keys = _train_keys(keys_bytes, path) if keys_bytes is not None else None
    train_set = _train_set(set_bytes, path) if set_bytes is not None else None
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
    if list(map(str, getattr(head, "classes_", []))) != manifest["classes"]:
        raise ModelFormatError(f"{path}: the head's classes differ from the manifest's 'classes'")
    meta = {k: v for k, v in manifest.items() if k not in ("backbone",)}
    return ProbeModel.fitted(backbone, head, meta, train_keys, train_set)


def _train_keys(data: bytes, path: Path) -> list[str]:
    try:
        keys = data.decode("ascii").split("\n") if data else []
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"{path}: {TRAIN_KEYS} is not ASCII text") from e
    if any(not _is_key(k) for k in keys):
        raise ModelFormatError(f"{path}: {TRAIN_KEYS} holds a line that is not a sha256 key")
    return keys


def _train_set(data: bytes, path: Path) -> tuple[list[str], list[str]]:
    """train-set.json: {"keys": [sha256, ...], "labels": [str, ...]} of equal length, checked before use."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: {TRAIN_SET} is not JSON ({e})") from e
    keys, labels = (body.get("keys"), body.get("labels")) if isinstance(body, dict) else (None, None)
    if not (isinstance(keys, list) and isinstance(labels, list) and len(keys) == len(labels)
            and all(isinstance(k, str) and _is_key(k) for k in keys) and all(isinstance(v, str) for v in labels)):
        raise ModelFormatError(f"{path}: {TRAIN_SET} must hold 'keys' (sha256 keys) and 'labels' (strings) of equal "
                               "length")
    return keys, labels


def _is_key(k: str) -> bool:
    return len(k) == 64 and all(c in "0123456789abcdef" for c in k)
