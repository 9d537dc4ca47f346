"""Benchmark 5: the regularization sweep: its cost and how good its choice is.

On the shared cached features (logreg head, ``probe.sweep.fit_head`` with a seeded 10 % validation split):

* cost: ``fit_head`` with the sweep (coarse grid + refinement + refit on train+val) vs one ``fit_head`` at the
  chosen C (the refit alone; median of two). Target: <= 3x.
* quality: test accuracy of the sweep's choice vs an exhaustive grid of log-spaced C values (1e-6 .. 1e6, no
  refinement) choosing the best on the same validation split. Target: within 0.3 accuracy points.
"""

from __future__ import annotations

import numpy as np

import harness as h
import workload as wl

NAME = "sweep"
TITLE = "5. Regularization sweep: cost and choice"
COST_TARGET = 3.0
ACC_TARGET_PT = 0.3


def run(cfg: h.Config) -> None:
    from probe.sweep import fit_head

    train, test = wl.shared_features(cfg)
    X, y = train.features, wl.labels(train)
    X_test, y_test = test.features, wl.labels(test)

    def test_acc(hf):
        return float((hf.estimator.predict(X_test) == y_test).mean())

    hf = wl.fit_head("logreg", X, y, seed=cfg.seed)  # shared with benchmarks 6 and 7
    (C,) = hf.chosen.values()
    rows = [{"method": "sweep (CLIP protocol)", "rep": 1, "fits": hf.sweep.n_fits + 1, "seconds": hf.fit_seconds,
             "sweep_s": hf.sweep.seconds, "C": C, "val_accuracy": hf.sweep.best_score, "test_accuracy": test_acc(hf),
             "not_converged": len(hf.sweep.not_converged)}]
    singles = []
    for rep in range(2):  # cheap: repeated
        one = fit_head("logreg", X, y, value=C, seed=cfg.seed)
        singles.append(one.fit_seconds)
        rows.append({"method": "one fit at the chosen C", "rep": rep + 1, "fits": 1, "seconds": one.fit_seconds,
                     "C": C, "test_accuracy": test_acc(one)})
    grid = np.logspace(-6, 6, cfg.sizes.exhaustive).tolist()
    ex = fit_head("logreg", X, y, val_split=0.1, seed=cfg.seed, grid=grid, refine_steps=0)
    (C_ex,) = ex.chosen.values()
    rows.append({"method": f"exhaustive grid ({len(grid)} C values)", "rep": 1, "fits": ex.sweep.n_fits + 1,
                 "seconds": ex.fit_seconds, "sweep_s": ex.sweep.seconds, "C": C_ex,
                 "val_accuracy": ex.sweep.best_score, "test_accuracy": test_acc(ex),
                 "not_converged": len(ex.sweep.not_converged)})
    cost = hf.fit_seconds / h.median(singles)
    gap = 100 * (rows[-1]["test_accuracy"] - rows[0]["test_accuracy"])
    rows.append({"method": "ratio sweep / one fit", "ratio": cost, "target": COST_TARGET, "met": cost <= COST_TARGET})
    rows.append({"method": "test accuracy: exhaustive - sweep (points)", "ratio": gap, "target": ACC_TARGET_PT,
                 "met": gap <= ACC_TARGET_PT})
    for r in rows:
        r.update(n_train=len(y), n_test=len(y_test), backbone=str(cfg.backbone))
    h.write_rows(cfg, NAME, rows)


def section(results: dict) -> tuple[str, list[dict]]:
    rows = results.get(NAME) or []
    runs = [r for r in rows if r["rep"]]
    table = [{"method": r["method"], "run": r["rep"], "fits": r["fits"], "seconds": h.fmt(r["seconds"]),
              "C": h.fmt(r["C"], 3), "val acc": h.fmt(r["val_accuracy"], 4),
              "test acc": h.fmt(r["test_accuracy"], 4), "not converged": r.get("not_converged", "")} for r in runs]
    cost = next((r for r in rows if r["method"].startswith("ratio")), None)
    gap = next((r for r in rows if r["method"].startswith("test accuracy")), None)
    if not rows:
        return "No results.", []
    text = [f"logreg on the cached {rows[0]['backbone']} features ({rows[0]['n_train']} train / {rows[0]['n_test']} "
            "test; the sweep holds out a seeded, stratified 10 % of "
            "train as validation; every model is refit on train+val). `fits` counts the refit.", "",
            h.md_table(table, list(table[0]) if table else [])]
    claims = []
    if cost:
        text += ["", f"Sweep cost: **{h.fmt(cost['ratio'], 3)}x** one fit at the chosen C "
                     f"(target <= {COST_TARGET:g}x). Exhaustive grid minus sweep, test accuracy: "
                     f"**{h.fmt(gap['ratio'], 2)} points** (target <= {ACC_TARGET_PT} points)."]
        claims.append(h.claim("5 sweep", "sweep time / one fit at the chosen C", f"{h.fmt(cost['ratio'], 3)}x",
                              f"<= {COST_TARGET:g}x", cost["met"] == "yes"))
        claims.append(h.claim("5 sweep", "test accuracy: exhaustive grid - sweep", f"{h.fmt(gap['ratio'], 2)} pt",
                              f"<= {ACC_TARGET_PT} pt", gap["met"] == "yes"))
    return "\n".join(text), claims


def main(argv=None):
    run(h.parse_config(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
