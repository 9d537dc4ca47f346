"""Gated refit: a challenger head from cached features, scored against the champion on a gate set, promoted only
when it is not worse.

    champion (registry) --training keys+labels--> old features (cache, never re-extracted)
    NEW_DATA --extract (only inputs not cached)--> new features --seeded --gate-split--> new train | gate
    policy all | new | window:N --> training rows --> regularization sweep --> challenger
    champion, challenger --same gate set--> scores --> register challenger (status active or rejected);
                                                      promote only if challenger >= champion - tolerance

Crash safety comes from the registry: the challenger's file is stored first, then one transaction inserts the
version and (when promoted) moves the champion. A kill at any point leaves the old champion in place.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .defaults import DEFAULT_CACHE
from .errors import ProbeError
from .model import ProbeModel, keys_digest
from .registry import Registry, load_model

log = logging.getLogger(__name__)

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
PROMOTED, REJECTED, NO_DRIFT = "promoted", "rejected", "no-drift"


@dataclass
class RefitResult:
    decision: str  # promoted | rejected | no-drift
    champion: object  # ModelVersion
    challenger: object | None = None  # ModelVersion, registered either way (None on no-drift)
    metric: str = "accuracy"
    champion_score: float | None = None
    challenger_score: float | None = None
    tolerance: float = 0.0
    gate_digest: str | None = None
    gate_keys: list[str] = field(default_factory=list)
    policy: str = "all"
    n_train: int = 0
    n_old: int = 0
    n_new: int = 0
    new_stats: object | None = None  # ExtractStats of the new data (and gate data)
    drift: object | None = None  # DriftReport with --if-drift
    seconds: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return {PROMOTED: 0, REJECTED: 3, NO_DRIFT: 4}[self.decision]

    def format(self) -> str:
        if self.decision == NO_DRIFT:
            return f"no drift against {self.champion.ref}: nothing refit"
        lines = [
            f"training rows: {self.n_train} ({self.n_old} from {self.champion.ref}'s training set, {self.n_new} new; "
            f"policy {self.policy})",
            f"new data: {self.new_stats.new} extracted, {self.new_stats.cached} cached" if self.new_stats else "",
            f"gate set: {len(self.gate_keys)} inputs, digest {self.gate_digest[:16]}",
            f"{self.metric}: champion {self.champion.ref} {self.champion_score:.4f}, "
            f"challenger {self.challenger.ref} {self.challenger_score:.4f} (tolerance {self.tolerance})",
        ]
        if self.decision == PROMOTED:
            lines.append(f"PROMOTED: {self.challenger.ref} is the champion of {self.challenger.name}")
        else:
            lines.append(f"REJECTED: {self.challenger.ref} is worse than {self.champion.ref} by more than the "
                         f"tolerance; the champion stays")
        return "\n".join(line for line in lines if line)


def parse_policy(policy: str) -> tuple[str, int | None]:
    m = re.fullmatch(r"(all|new)|window:([1-9][0-9]*)", policy or "")
    if not m:
        raise ProbeError(f"--policy {policy!r}: use all, new or window:N (N >= 1)")
    return (m[1], None) if m[1] else ("window", int(m[2]))


def gate_score(model: ProbeModel, X: np.ndarray, y, metric: str) -> float:
    """``metric`` of ``model``'s head on features ``X`` with labels ``y`` (labels the head does not know count as
    errors)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    pred = np.asarray([str(c) for c in model.classes_])[np.argmax(model.predict_proba_features(X), axis=1)]
    y = np.asarray([str(v) for v in y])
    if metric == "accuracy":
        return float(accuracy_score(y, pred))
    if metric == "balanced_accuracy":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # predicted classes absent from y: expected on a shifted gate set
            return float(balanced_accuracy_score(y, pred))
    return float(f1_score(y, pred, average="macro", labels=sorted(set(y)), zero_division=0))


def _head_options(model: ProbeModel) -> dict:
    """How the champion's head was built: name, standardize / l2 steps, fixed params."""
    head = (model.meta_ or {}).get("head", {})
    steps = [s.get("name") for s in head.get("steps", [])]
    return {"name": head.get("name", "logreg"), "standardize": "scale" in steps, "l2_normalize": "l2" in steps}


def refit(name: str, new_data, *, registry: str | os.PathLike | Registry | None = None, cache=DEFAULT_CACHE,
          policy: str = "all", gate=None, gate_split: float = 0.2, metric: str = "accuracy",
          tolerance: float = 0.005, if_drift: bool = False, alpha: float = 0.05, seed: int = 0,
          trust: bool = False, check_versions: bool = True, **extract_options) -> RefitResult:
    """Refit ``name``'s champion head on ``policy`` data, gate it against the champion, register it, and promote
    it when its ``metric`` on the gate set is at least the champion's minus ``tolerance``."""
    from .heads import head_description
    from .sweep import fit_head
    from .sources import resolve
    from .training import split_by_key, train_set_rows

    t0 = time.perf_counter()
    kind, window = parse_policy(policy)
    if metric not in METRICS:
        raise ProbeError(f"--metric {metric!r}: use one of {', '.join(METRICS)}")
    if gate is None and not 0 < gate_split < 1:
        raise ProbeError(f"--gate-split {gate_split}: give a fraction between 0 and 1, or --gate DATA")
    reg = registry if isinstance(registry, Registry) else Registry(registry)
    champion_v = reg.resolve(name)
    champion = load_model(champion_v.ref, registry=reg, trust=trust, check_versions=check_versions)
    result = RefitResult(decision=REJECTED, champion=champion_v, metric=metric, tolerance=tolerance, policy=policy)

    new_fs = champion.features(resolve(new_data), cache=cache, write=True, strict=False, **extract_options)
    for f in new_fs.failures:
        log.warning("new data: skipped %s", f.error)
    result.new_stats = new_fs.stats
    result.seconds["extract"] = new_fs.stats.seconds["total"]
    y_new = new_fs.y

    if if_drift:
        from .drift import check_model

        t = time.perf_counter()
        result.drift = check_model(champion, None, cache=cache, alpha=alpha, seed=seed, current_features=new_fs)
        result.seconds["drift"] = time.perf_counter() - t
        if not result.drift.drift:
            result.decision = NO_DRIFT
            result.seconds["total"] = time.perf_counter() - t0
            return result

    # The gate set: given data, or a seeded split of the new data that training never sees.
    if gate is not None:
        gate_fs = champion.features(resolve(gate), cache=cache, write=True, strict=False, **extract_options)
        result.new_stats.new += gate_fs.stats.new
        result.new_stats.cached += gate_fs.stats.cached
        result.new_stats.model_batches += gate_fs.stats.model_batches
        X_gate, y_gate, gate_keys = gate_fs.features, gate_fs.y, gate_fs.keys
        new_rows = np.arange(len(new_fs))
    else:
        new_rows, gate_rows = split_by_key(new_fs.keys, y_new, gate_split, seed)
        X_gate, y_gate = new_fs.features[gate_rows], y_new[gate_rows]
        gate_keys = [new_fs.keys[i] for i in gate_rows]
    excluded = set(gate_keys)
    new_rows = [i for i in new_rows if new_fs.keys[i] not in excluded]
    new_keys = [new_fs.keys[i] for i in new_rows]
    new_labels = [str(y_new[i]) for i in new_rows]

    # Training rows by policy: old rows (champion's training set, features from the cache) then new rows.
    old_keys, old_labels = [], []
    if kind in ("all", "window"):
        if champion.train_set_ is None:
            raise ProbeError(f"{champion_v.ref} records no training labels (a model file from before train-set.json);"
                             " use --policy new")
        pairs = [(k, lab) for k, lab in zip(*champion.train_set_) if k not in excluded]
        old_keys, old_labels = [k for k, _ in pairs], [lab for _, lab in pairs]
    if kind == "window":
        keep_new = min(window, len(new_keys))
        keep_old = window - keep_new
        new_keys, new_labels = new_keys[len(new_keys) - keep_new:], new_labels[len(new_labels) - keep_new:]
        old_keys, old_labels = old_keys[len(old_keys) - keep_old:] if keep_old else [], \
            old_labels[len(old_labels) - keep_old:] if keep_old else []
    if old_keys:
        from .drift import training_features

        X_old = training_features(champion, cache, old_keys)
    else:
        X_old = np.zeros((0, champion.backbone_["dim"]), dtype=np.float32)
    row_of = {k: i for i, k in enumerate(new_fs.keys)}
    X_new = new_fs.features[[row_of[k] for k in new_keys]] if new_keys else X_old[:0]
    X = np.concatenate([X_old, X_new])
    y = np.asarray(old_labels + new_labels, dtype=object)
    if len(X) == 0:
        raise ProbeError("no training rows left for the challenger (all new inputs went to the gate set?)")
    result.n_old, result.n_new, result.n_train = len(old_keys), len(new_keys), len(X)

    opts = _head_options(champion)
    t = time.perf_counter()
    hf = fit_head(opts["name"], X, y, standardize=opts["standardize"], l2_normalize=opts["l2_normalize"],
                  seed=seed)
    result.seconds["fit"] = time.perf_counter() - t
    train_keys = old_keys + new_keys
    train_labels = old_labels + new_labels
    meta = {k: v for k, v in (champion.meta_ or {}).items()
            if k not in ("registry", "created", "head_file", "format", "format_version", "classes", "versions")}
    meta["head"] = {"name": opts["name"], **head_description(hf.estimator), "chosen": hf.chosen}
    meta["training"] = {
        "source": list((champion.meta_.get("training") or {}).get("source", [])) if kind != "new" else [],
        "new_source": [str(d) for d in (new_data if isinstance(new_data, (list, tuple)) else [new_data])],
        "policy": policy, "seed": seed, "parent": champion_v.ref,
        "keys_digest": keys_digest(train_keys, train_labels), "n_inputs": len(train_keys),
        "n_cached": int(new_fs.stats.cached) + len(old_keys), "n_extracted": int(new_fs.stats.new),
    }
    challenger = ProbeModel.fitted(champion.backbone_, hf.estimator, meta, sorted(set(train_keys)),
                                   train_set_rows(train_keys, train_labels), cache=cache)

    result.gate_keys = list(gate_keys)
    result.gate_digest = keys_digest(gate_keys, [str(v) for v in y_gate])
    result.champion_score = gate_score(champion, X_gate, y_gate, metric)
    result.challenger_score = gate_score(challenger, X_gate, y_gate, metric)
    promote = result.challenger_score >= result.champion_score - tolerance
    result.decision = PROMOTED if promote else REJECTED
    meta["metrics"] = {metric: result.challenger_score, "n": len(gate_keys), "evaluated_on": "gate set"}
    gate_record = {
        "decision": result.decision, "metric": metric, "tolerance": tolerance,
        "champion": champion_v.version, "champion_score": result.champion_score,
        "challenger_score": result.challenger_score, "gate_digest": result.gate_digest, "n_gate": len(gate_keys),
        "gate_source": str(gate) if gate is not None else f"split {gate_split} of the new data (seed {seed})",
        "policy": policy, "drift": None if result.drift is None else result.drift.to_dict(),
    }
    reg.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=reg.root, prefix=".refit-") as tmp:
        path = challenger.save(Path(tmp) / "challenger.probe")
        result.challenger = reg.register(path, champion_v.name, parent=champion_v.version, gate=gate_record,
                                         promote=promote)
    result.seconds["total"] = time.perf_counter() - t0
    log.info("refit %s: %s (%s %.4f vs %.4f)", name, result.decision, metric, result.challenger_score,
             result.champion_score)
    return result
