"""Benchmark 8: a data shift — drift detection, gated refit from cache, champion vs challenger.

A champion head is trained on one class mix of Fashion-MNIST (classes 0-4 three times as frequent as 5-9) and
registered. The "new" data has the opposite mix, and half of it lost contrast (pixels pulled 65 % towards grey).
Recorded, through the public API (probe.fit, probe.drift.check_model, probe.refit.refit, the registry):

* drift p-values of every test against the champion's training inputs, for held-out data of the champion's own
  mix (no shift) and for the new data (shift);
* ``refit(--if-drift, --policy all, --gate-split 0.2)``: the gate decision and both gate scores, and its wall time
  vs a from-scratch extract + fit of the same data (champion's training data + new data, empty cache);
* accuracy of champion and challenger on a shifted test set (test split, new mix, half low-contrast).
"""

from __future__ import annotations

import shutil

import numpy as np

import harness as h
import workload as wl

NAME = "shift"
TITLE = "11. Data shift: drift check, gated refit, champion vs challenger"
CONTRAST = 0.35  # kept fraction of contrast in the corrupted half
MAJOR, MINOR = 3.0, 1.0


def _mix(labels: np.ndarray, heavy_low: bool) -> np.ndarray:
    low = labels < wl.N_CLASSES // 2
    return np.where(low == heavy_low, MAJOR, MINOR)


def _draw(rng, labels, n: int, heavy_low: bool, exclude=None) -> np.ndarray:
    w = _mix(labels, heavy_low).astype(np.float64)
    if exclude is not None:
        w[exclude] = 0.0
    return np.sort(rng.choice(len(labels), size=n, replace=False, p=w / w.sum()))


def corrupt(images: np.ndarray, rng, fraction: float = 0.5) -> np.ndarray:
    """Contrast loss on a seeded ``fraction`` of the images."""
    out = images.copy()
    idx = rng.choice(len(out), size=int(round(fraction * len(out))), replace=False)
    out[idx] = np.clip((out[idx].astype(np.float64) - 128) * CONTRAST + 128, 0, 255).astype(np.uint8)
    return out


def sizes(cfg: h.Config) -> dict:
    s = cfg.sizes
    return {"champion": min(max(60, s.train // 2), 10000), "same": min(max(40, s.train // 8), 2500),
            "new": min(max(60, s.train // 4), 5000), "test": min(max(40, s.test // 2), 5000)}


def make_data(cfg: h.Config, root) -> dict:
    """Folders: champion training data, held-out data of the same mix, new (shifted) data, shifted test data."""
    from probe.datasets import write_image_folder

    n = sizes(cfg)
    rng = np.random.default_rng(cfg.seed)
    pool_n = 2 * (n["champion"] + n["same"] + n["new"])
    start = max(0, 60000 - pool_n) if cfg.source.name == "fashion-mnist" else 200000
    images, labels = cfg.source.take("train", start, pool_n)
    first = _draw(rng, labels, n["champion"] + n["same"], heavy_low=True)
    champion, same = first[:n["champion"]], first[n["champion"]:]
    taken = np.zeros(len(labels), dtype=bool)
    taken[first] = True
    new = _draw(rng, labels, n["new"], heavy_low=False, exclude=taken)
    test_pool = min(10000, 2 * n["test"] + 200)
    t_images, t_labels = cfg.source.take("test", 0, test_pool)
    test = _draw(rng, t_labels, n["test"], heavy_low=False)
    folders = {}
    for name, imgs, labs, idx in (("champion", images[champion], labels[champion], champion),
                                  ("same", images[same], labels[same], same),
                                  ("new", corrupt(images[new], rng), labels[new], new),
                                  ("test", corrupt(t_images[test], rng), t_labels[test], test)):
        out = wl.fresh_dir(root / name)
        for i, (img, lab) in enumerate(zip(imgs, labs)):  # file names carry the source index: all distinct
            write_image_folder(img[None], lab[None], out, start=int(idx[i]), prefix=f"{name}-")
        folders[name] = out
    return folders


def run(cfg: h.Config) -> None:
    import probe
    from probe.drift import check_model
    from probe.refit import refit
    from probe.registry import Registry, load_model

    ref = cfg.backbone
    root = wl.fresh_dir(cfg.work / "shift")
    data = make_data(cfg, root / "data")
    bs, _ = wl.tuned_batch_size(cfg, ref)
    cache, reg = root / "cache", Registry(root / "models")
    options = dict(batch_size=bs, device=cfg.device, progress=False)
    champ = probe.fit(str(data["champion"]), "logreg", backbone=ref.name, weights=ref.weights, cache=str(cache),
                      seed=cfg.seed, output=root / "champion.probe", **options)
    reg.register(champ.path, "shift")
    champion = load_model("shift", registry=reg)
    rows = []

    no_shift = check_model(champion, str(data["same"]), cache=str(cache), seed=cfg.seed, **options)
    rows += _drift_rows("drift: no shift", no_shift)

    with h.Stopwatch() as sw:
        res = refit("shift", str(data["new"]), registry=reg, cache=str(cache), if_drift=True, seed=cfg.seed,
                    **options)
    refit_s = sw.seconds
    if res.drift is not None:
        rows += _drift_rows("drift: shift", res.drift)
    rows.append({"phase": "gate", "item": res.decision, "statistic": res.challenger_score,
                 "champion_score": res.champion_score, "challenger_score": res.challenger_score,
                 "n": len(res.gate_keys), "policy": res.policy, "n_train": res.n_train,
                 "new_extracted": res.new_stats.new, "model_batches": res.new_stats.model_batches})

    test_fs = champion.features(probe.resolve(str(data["test"])), cache=str(cache), write=True, **options)
    y = test_fs.y
    models = {"champion": champion}
    if res.challenger is not None:
        models["challenger"] = load_model(res.challenger.ref, registry=reg)
    for name, m in models.items():
        pred = m.classes_[np.argmax(m.predict_proba_features(test_fs.features), axis=1)]
        rows.append({"phase": "accuracy on shifted test", "item": name, "accuracy": float(np.mean(pred == y)),
                     "n": len(y)})

    # From scratch: the same data (champion's + new), empty cache, extract + fit with the sweep.
    scratch_cache = root / "scratch-cache"
    with h.Stopwatch() as sw:
        probe.fit([str(data["champion"]), str(data["new"])], "logreg", backbone=ref.name, weights=ref.weights,
                  cache=str(scratch_cache), seed=cfg.seed, **options)
    scratch_s = sw.seconds
    shutil.rmtree(scratch_cache, ignore_errors=True)
    drift_s = res.seconds.get("drift", 0.0)
    rows.append({"phase": "time", "item": "refit --if-drift: drift check + extract new + fit + gate + register",
                 "seconds": refit_s, "new_extracted": res.new_stats.new})
    rows.append({"phase": "time", "item": "of which the drift check", "seconds": drift_s})
    rows.append({"phase": "time", "item": "from scratch: extract all + fit", "seconds": scratch_s})
    rows.append({"phase": "ratio", "item": "from scratch / refit without the drift check",
                 "ratio": scratch_s / max(1e-9, refit_s - drift_s)})
    h.write_rows(cfg, NAME, rows)


def _drift_rows(phase: str, report) -> list[dict]:
    return [{"phase": phase, "item": t.name, "statistic": t.statistic, "p_value": t.p_value,
             "n": report.n_current, "drift": report.drift} for t in report.tests]


def section(results: dict) -> tuple[str, list[dict]]:
    rows = results.get(NAME) or []
    if not rows:
        return "No results.", []
    drift = {}
    for r in rows:
        if r["phase"].startswith("drift"):
            drift.setdefault(r["item"], {})[r["phase"]] = r
    table = [{"test": t, "p no shift": h.fmt(d.get("drift: no shift", {}).get("p_value"), 3),
              "p shift": h.fmt(d.get("drift: shift", {}).get("p_value"), 3)} for t, d in drift.items()]
    acc = {r["item"]: h.num(r["accuracy"]) for r in rows if r["phase"] == "accuracy on shifted test"}
    gate = next((r for r in rows if r["phase"] == "gate"), {})
    times = [r for r in rows if r["phase"] == "time"]
    ratio = next((r for r in rows if r["phase"] == "ratio"), None)
    verdicts = {r["phase"]: r["drift"] for r in rows if r["phase"].startswith("drift")}
    text = [
        "Champion trained on one class mix; new data with the opposite mix, half of it with lost contrast. "
        "Drift p-values against the champion's training inputs (features read from the cache):",
        "",
        h.md_table(table, ["test", "p no shift", "p shift"]),
        "",
        f"Verdicts: no shift -> drift {verdicts.get('drift: no shift', '?')}, shift -> drift "
        f"{verdicts.get('drift: shift', '?')}. Gate ({gate.get('policy', '?')}, {gate.get('n', '?')} gate inputs): "
        f"champion {h.fmt(gate.get('champion_score'), 3)}, challenger {h.fmt(gate.get('challenger_score'), 3)} "
        f"-> **{gate.get('item', '?')}** (the refit extracted {gate.get('new_extracted', '?')} new inputs, "
        f"{gate.get('model_batches', '?')} model batches; old inputs came from the cache).",
        "",
        f"Accuracy on the shifted test set: champion {h.fmt(acc.get('champion'), 3)}, challenger "
        f"{h.fmt(acc.get('challenger'), 3)}.",
        "",
        h.md_table([{"run": r["item"], "seconds": h.fmt(r["seconds"])} for r in times], ["run", "seconds"]),
    ]
    claims = []
    if "drift: shift" in verdicts:
        claims.append(h.claim("11 shift", "drift flagged on the shifted data, not on the same mix",
                              f"shift {verdicts['drift: shift']}, same mix {verdicts.get('drift: no shift')}",
                              "yes / no", verdicts["drift: shift"] == "yes" and verdicts.get("drift: no shift") == "no"))
    if "challenger" in acc:
        claims.append(h.claim("11 shift", "shifted-test accuracy: challenger - champion",
                              f"{h.fmt(100 * (acc['challenger'] - acc['champion']), 3)} pt", "> 0",
                              acc["challenger"] > acc["champion"]))
    if ratio:
        claims.append(h.claim("11 shift", "from-scratch extract + fit / gated refit (without its drift check)",
                              f"{h.fmt(ratio['ratio'], 3)}x", "> 1", h.num(ratio["ratio"]) > 1))
        text += ["", f"From scratch / refit (without its drift check): **{h.fmt(ratio['ratio'], 3)}x**."]
    return "\n".join(text), claims


def main(argv=None):
    run(h.parse_config(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
