"""Benchmark 7: memory and storage.

* Peak RSS of ``python -m probe.cli extract`` of N and of 4N files, each in a fresh process (``ru_maxrss`` from
  ``os.wait4``), next to a process that only imports probe and loads the backbone. Should be flat in N.
* Feature-cache bytes per row for float32 vs float16 storage (``--dtype``), from engine-written caches.
* Test accuracy of a logreg head trained on float32 vs float16 features of the shared subset (the float16 rows are
  the shared cache's float32 model outputs written into a float16 feature space, which is what the engine
  stores for ``dtype="float16"``: it computes float32 and casts on write).
"""

from __future__ import annotations

import csv
import dataclasses
import shutil

import harness as h
import workload as wl

NAME = "memory"
TITLE = "7. Memory and storage"
FLAT_TARGET = 1.10  # peak RSS of 4N / N


def _cli_extract(cfg: h.Config, files, cache, bs: int, dtype: str) -> tuple[h.ProcessRun, object]:
    from probe import FeatureCache

    listing = cache.with_suffix(".csv")
    with open(listing, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"])
        w.writerows([p] for p in files)
    if cache.exists():
        shutil.rmtree(cache)
    ref = cfg.backbone
    args = ["extract", str(listing), "--cache", str(cache), "--backbone", ref.name, "--batch-size", str(bs),
            "--dtype", dtype, "--no-progress"]
    args += ["--weights", ref.weights] if ref.weights else []
    args += ["--device", cfg.device] if cfg.device else []
    run = h.peak_rss("-m", "probe.cli", args, cwd=h.REPO_ROOT)
    if run.returncode != 0:
        raise RuntimeError(f"probe {' '.join(args)} failed ({run.returncode}):\n{run.output[-2000:]}")
    (store,) = FeatureCache(cache).stores()
    return run, store


def run(cfg: h.Config) -> None:
    ref = cfg.backbone
    bs, _ = wl.tuned_batch_size(cfg, ref)
    n = cfg.sizes.memory
    work = cfg.work / "memory"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    load = f"import probe.cli, probe.engine; probe.load_backbone({ref.name!r}, {ref.weights!r})"
    base = h.peak_rss("-c", load, cwd=h.REPO_ROOT)
    rows.append({"run": "import probe + load backbone", "inputs": 0, "dtype": "", "peak_rss_mb": base.peak_rss_mb,
                 "seconds": base.seconds})
    runs = [(n, "float32"), (4 * n, "float32")] * 2 + [(n, "float16")]  # N and 4N interleaved, twice
    for count, dtype in runs:
        files = wl.pool_files(cfg, count)
        proc, store = _cli_extract(cfg, files, work / f"cache-{count}-{dtype}", bs, dtype)
        rows.append({"run": f"extract {count} ({dtype})", "inputs": count, "dtype": dtype,
                     "peak_rss_mb": proc.peak_rss_mb, "seconds": proc.seconds, "rows": len(store),
                     "cache_bytes": store.nbytes(), "bytes_per_row": store.nbytes() / len(store),
                     "feature_bytes_per_row": store.space.dim * (4 if dtype == "float32" else 2)})
        store.close()
    peak = {c: h.median(r["peak_rss_mb"] for r in rows if r.get("inputs") == c and r["dtype"] == "float32")
            for c in (n, 4 * n)}
    growth = peak[4 * n] / peak[n]
    rows.append({"run": "ratio peak RSS 4N / N (medians)", "ratio": growth, "target": FLAT_TARGET,
                 "met": growth <= FLAT_TARGET, "mb_per_1000_inputs": (peak[4 * n] - peak[n]) / (3 * n) * 1000})
    rows += dtype_accuracy_rows(cfg)
    for r in rows:
        r["backbone"] = str(ref)
    h.write_rows(cfg, NAME, rows)


def dtype_accuracy_rows(cfg: h.Config) -> list[dict]:
    from probe import FeatureCache

    train, test = wl.shared_features(cfg)
    y, y_test = wl.labels(train), wl.labels(test)
    root = cfg.work / "cache" / "float16"
    if root.exists():
        shutil.rmtree(root)
    store16 = FeatureCache(root).open(dataclasses.replace(train.space, dtype="float16"))
    for fs in (train, test):
        for i in range(0, len(fs), 1024):
            store16.write_segment(fs.keys[i:i + 1024], fs.features[i:i + 1024], fs.paths[i:i + 1024])
    store32 = FeatureCache(wl.shared_cache(cfg)).open(train.space, create=False)
    rows = []
    for dtype, store in (("float32", store32), ("float16", store16)):
        X, X_test = store.get(train.keys), store.get(test.keys)
        hf = wl.fit_head("logreg", X, y, seed=cfg.seed)
        acc = float((hf.estimator.predict(X_test) == y_test).mean())
        (C,) = hf.chosen.values()
        rows.append({"run": f"logreg on {dtype} cache", "dtype": dtype, "rows": len(store),
                     "cache_bytes": store.nbytes(), "bytes_per_row": store.nbytes() / len(store),
                     "test_accuracy": acc, "C": C, "n_train": len(y), "n_test": len(y_test)})
        store.close()
    rows.append({"run": "test accuracy float16 - float32 (points)",
                 "ratio": 100 * (rows[1]["test_accuracy"] - rows[0]["test_accuracy"])})
    return rows


def section(results: dict) -> tuple[str, list[dict]]:
    rows = results.get(NAME) or []
    procs = [r for r in rows if r["run"].startswith(("import", "extract"))]
    table = [{"process": r["run"], "peak RSS MiB": h.fmt(r["peak_rss_mb"]), "seconds": h.fmt(r["seconds"]),
              "cache rows": r["rows"], "cache bytes/row": h.fmt(r["bytes_per_row"]),
              "feature bytes/row": r["feature_bytes_per_row"]} for r in procs]
    flat = next((r for r in rows if r["run"].startswith("ratio peak")), None)
    acc = [r for r in rows if r["run"].startswith("logreg on")]
    diff = next((r for r in rows if r["run"].startswith("test accuracy")), None)
    text = [f"Backbone {rows[0]['backbone']}; each extraction is `python -m probe.cli extract LIST.csv` in a "
            "fresh process with a cold cache (batch size pinned to the auto-tuned value; cache bytes/row counts "
            "every file of the feature space: HDF5 segments with keys, paths and attributes).", "",
            h.md_table(table, list(table[0]))]
    claims = []
    if flat:
        text += ["", f"Peak RSS 4N / N (medians of two runs each) = **{h.fmt(flat['ratio'], 3)}** "
                     f"({h.fmt(flat['mb_per_1000_inputs'], 2)} MiB per 1000 more inputs)."]
        claims.append(h.claim("7 memory", "peak RSS of extracting 4N / N inputs", h.fmt(flat["ratio"], 3),
                              f"<= {FLAT_TARGET} (flat)", flat["met"] == "yes"))
    if acc:
        text += ["", "float32 vs float16 storage of the shared subset's features (same logreg protocol):", "",
                 h.md_table([{"cache": r["run"].removeprefix("logreg on "), "rows": r["rows"],
                              "bytes/row": h.fmt(r["bytes_per_row"]), "C": h.fmt(r["C"]),
                              "test accuracy": h.fmt(r["test_accuracy"], 4)} for r in acc],
                            ["cache", "rows", "bytes/row", "C", "test accuracy"])]
        per = {r["dtype"]: h.num(r["bytes_per_row"]) for r in acc}
        claims.append(h.claim("7 memory", "float16 / float32 cache bytes per row",
                              h.fmt(per["float16"] / per["float32"], 3), "report (~0.5)", None))
    if diff:
        claims.append(h.claim("7 memory", "test accuracy float16 - float32", f"{h.fmt(diff['ratio'], 2)} pt",
                              "report (~0)", None))
    return "\n".join(text), claims


def main(argv=None):
    run(h.parse_config(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
