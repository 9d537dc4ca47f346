"""Benchmark 6: linear-probe accuracy table.

The shared Fashion-MNIST subset: cached backbone features x {logreg, linear-svm, ridge, knn}, and logistic
regression on the raw pixels of the same files, all through ``probe.sweep.fit_head`` with the same protocol
(seeded 10 % validation split for the sweep, refit on train+val), scored on the held-out test files with
``probe.metrics.classification_metrics``: accuracy, macro-F1, expected calibration error.
"""

from __future__ import annotations

import numpy as np

import harness as h
import workload as wl

NAME = "accuracy"
TITLE = "6. Linear-probe accuracy"
HEADS = ("logreg", "linear-svm", "ridge", "knn")


def pixels(paths) -> np.ndarray:
    """Raw grayscale pixels in [0, 1], one row per file."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32).ravel() / 255.0 for p in paths])


def run(cfg: h.Config) -> None:
    from probe.metrics import classification_metrics

    train, test = wl.shared_features(cfg)
    y, y_test = wl.labels(train), wl.labels(test)
    inputs = [(str(cfg.backbone), head, train.features, test.features) for head in HEADS]
    inputs.append(("raw pixels", "logreg", pixels(train.paths), pixels(test.paths)))
    rows = []
    for features, head, X, X_test in inputs:
        hf = wl.fit_head(head, X, y, seed=cfg.seed)
        m = classification_metrics(y_test, hf.estimator.predict_proba(X_test), hf.classes_)
        rows.append({
            "features": features, "head": head, "dim": X.shape[1], "n_train": len(y), "n_test": len(y_test),
            "chosen": ";".join(f"{k.removeprefix('clf__')}={v:.4g}" for k, v in hf.chosen.items()),
            "val_score": hf.sweep.best_score if hf.sweep else None, "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"], "ece": m["ece"], "fit_s": hf.fit_seconds,
            "calibrated": hf.calibrated,
        })
        h.log.info("accuracy %s + %s: %.4f", features, head, m["accuracy"])
    h.write_rows(cfg, NAME, rows)


def section(results: dict) -> tuple[str, list[dict]]:
    rows = results.get(NAME) or []
    table = [{"features": r["features"], "head": r["head"], "dim": r["dim"], "chosen": r["chosen"],
              "accuracy": h.fmt(r["accuracy"], 4), "macro-F1": h.fmt(r["macro_f1"], 4), "ECE": h.fmt(r["ece"], 3),
              "fit s": h.fmt(r["fit_s"]), "calibrated (Platt)": r["calibrated"]} for r in rows]
    n = f"{rows[0]['n_train']} train / {rows[0]['n_test']} test" if rows else "?"
    text = [f"{rows[0]['data'] if rows else '?'} subset, {n}. Same protocol for every row "
            "(`fit_head`: sweep on a seeded 10 % validation split, refit on train+val); ECE over 15 bins.", "",
            h.md_table(table, list(table[0]) if table else [])]
    claims = []
    feats = [r for r in rows if r["features"] != "raw pixels"]
    pix = next((r for r in rows if r["features"] == "raw pixels"), None)
    if feats and pix:
        best = max(feats, key=lambda r: h.num(r["accuracy"]))
        diff = 100 * (h.num(best["accuracy"]) - h.num(pix["accuracy"]))
        claims.append(h.claim("6 accuracy", f"best probe ({best['head']}) vs logreg on raw pixels",
                              f"{h.fmt(best['accuracy'], 4)} vs {h.fmt(pix['accuracy'], 4)} ({diff:+.1f} pt)",
                              "report", None))
    return "\n".join(text), claims


def main(argv=None):
    run(h.parse_config(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
