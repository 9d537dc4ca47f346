"""Benchmark 9: inference runtimes — eager PyTorch vs ONNX Runtime vs OpenVINO, end to end and forward only.

For each backbone (the main one and the speed backbone) and each installed runtime, side by side in one process
and interleaved ``reps`` times:

* ``probe.extract`` on PNG files into a cold feature space (hashing, decoding, preprocessing, the runtime, cache
  writes: the whole call) with ``runtime=<name>``; the export (``<cache>/runtimes``) and the tuning memo are
  kept between reps, as on a user's second run, and their one-off costs are reported separately;
* the runtime's own forward rate on the same images preloaded as tensors, same batch size (the compute limit);
* ``probe predict`` (the Python API, ``write=False``, a logistic-regression model) on the same files, for the main
  backbone when its weights are real (a model cannot record ``weights="random"``).

Each runtime uses the batch size probe's tuning picks for it. Targets: EfficientNet-Lite0 end to end >= 2.5x eager
with the fastest runtime, and every compiled runtime's end-to-end rate >= 0.9 of its own forward rate.
"""

from __future__ import annotations

import shutil

import harness as h
import workload as wl

NAME = "runtime"
TITLE = "9. Inference runtimes: eager PyTorch vs ONNX Runtime vs OpenVINO"
TARGET_SPEEDUP = 2.5  # end to end vs eager, EfficientNet-Lite0
TARGET_RATIO = 0.9  # end to end / the runtime's own forward rate
SPEEDUP_BACKBONE = "efficientnet-lite0"


def runtimes(cfg: h.Config) -> list[str]:
    """eager plus every compiled runtime installed and usable on the device (CPU, float32)."""
    from probe import runtime as rt

    dev, precision = wl.device_and_precision(cfg)
    if dev.type != "cpu" or precision != "float32":
        return ["eager"]
    return ["eager"] + [n for n in rt.COMPILED if rt.available(n)]


def run(cfg: h.Config) -> None:
    from probe import runtime as rt
    from probe.tuning import tuned_batch_size

    files = wl.pool_files(cfg, cfg.sizes.throughput)
    dev, precision = wl.device_and_precision(cfg)
    names = runtimes(cfg)
    rows = []
    refs = [cfg.backbone] + ([cfg.speed_backbone] if cfg.speed_backbone != cfg.backbone else [])
    for ref in refs:
        bb, _ = wl.backbone(ref)
        bb.to(dev)
        root = cfg.work / "runtime" / ref.tag
        caches = {n: wl.fresh_dir(root / "extract" / n) for n in names}
        # One-off costs: export (first compiled runtime only) + building the runner, then the batch-size tuning.
        setup, runners, batch = {}, {}, {}
        for n in names:
            with h.Stopwatch() as sw:
                runners[n] = rt.make_runner(bb, n, dev, precision, caches[n])
            setup[n] = sw.seconds
            if runners[n].name != n:
                raise RuntimeError(f"{ref}: {n} fell back to {runners[n].name} (see the warning above)")
            default = 128 if dev.type == "cuda" else 8
            batch[n] = tuned_batch_size(bb, dev, precision, caches[n] / "tuning.json", default, runner=runners[n])
            h.log.info("%s %s: setup %.1f s, batch %d", ref, n, setup[n], batch[n])
        x = wl.preload(bb, files)
        models = _predict_models(cfg, ref, names, root) if _can_predict(ref) else {}
        per_rep = []
        for rep in range(cfg.sizes.reps):
            eager = {}
            for n in names:
                _cold(caches[n])
                fs, wall = wl.extract(cfg, files, bb, caches[n], batch_size=batch[n], runtime=n)
                assert fs.stats.runtime == n and fs.stats.new == len(files), (fs.stats.runtime, fs.stats.new)
                fwd_ips, fwd_s = forward_rate(runners[n], x, batch[n])
                row = {
                    "backbone": str(ref), "runtime": n, "rep": rep + 1, "images": len(files),
                    "extract_ips": len(files) / wall, "forward_ips": fwd_ips, "ratio": len(files) / wall / fwd_ips,
                    "extract_wall_s": wall, "forward_s": fwd_s, "setup_s": setup[n],
                    **h.stats_columns(fs.stats), "batch_size": batch[n],
                }
                if n in models:
                    row["predict_ips"] = predict_rate(cfg, models[n], files, root / "predict", n, batch[n])
                eager.setdefault("extract_ips", row["extract_ips"])
                eager.setdefault("predict_ips", row.get("predict_ips"))
                row["speedup"] = row["extract_ips"] / eager["extract_ips"]
                if row.get("predict_ips") and eager["predict_ips"]:
                    row["predict_speedup"] = row["predict_ips"] / eager["predict_ips"]
                rows.append(row)
                per_rep.append(row)
                h.log.info("runtime %s %s rep %d: extract %.1f img/s (%.2fx eager), forward %.1f img/s (ratio %.2f)%s",
                           ref, n, rep + 1, row["extract_ips"], row["speedup"], fwd_ips, row["ratio"],
                           f", predict {row['predict_ips']:.1f} img/s" if "predict_ips" in row else "")
        for n in names:
            mine = [r for r in per_rep if r["runtime"] == n]
            summary = {k: h.median(r[k] for r in mine if k in r) for k in mine[0]
                       if isinstance(mine[0][k], (int, float)) and k != "rep"}
            summary.update(backbone=str(ref), runtime=n, rep="median", images=len(files), batch_size=batch[n],
                           workers=mine[0]["workers"])
            rows.append(summary)
    h.write_rows(cfg, NAME, rows)


def _cold(cache) -> None:
    """A cold feature space and hash memo; the export and the tuning memo stay (a user's second run)."""
    for p in cache.iterdir():
        if p.name == "spaces" or p.name.startswith("hashes.sqlite") or p.name == "last-extract.json":
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def forward_rate(runner, x, batch_size: int) -> tuple[float, float]:
    """(images/s, seconds) of ``runner`` alone over the preloaded ``x``, in the engine's batches and layout."""
    def batch(i):
        b = x[i:i + batch_size].to(runner.device)
        return b if runner.channels_last else b.contiguous()

    runner(batch(0))  # warm-up, not counted
    with h.Stopwatch() as sw:
        for i in range(0, len(x), batch_size):
            runner(batch(i))
    return len(x) / sw.seconds, sw.seconds


def _can_predict(ref: h.BackboneRef) -> bool:
    return ref.weights is None  # a model file records the weights' sha256; "random" weights are not a file


def _predict_models(cfg: h.Config, ref: h.BackboneRef, names: list[str], root) -> dict:
    """One loaded model per runtime (each keeps its own extractor), trained once on a small labelled folder."""
    import probe

    folder = wl.image_folder(cfg, "train", 0, max(40, cfg.sizes.throughput // 4), "runtime-fit")
    path = root / "model.probe"
    probe.fit(folder, "logreg", backbone=ref.name, weights=ref.weights, cache=str(root / "fit-cache"), value=1.0,
              val_split=0.0, output=str(path), device=cfg.device, progress=False, runtime="eager")
    (root / "predict").mkdir(parents=True, exist_ok=True)  # holds the exports; write=False stores no features
    models = {n: probe.load(path) for n in names}
    return models


def predict_rate(cfg: h.Config, model, files, cache, runtime: str, batch_size: int) -> float:
    """Images/s of ``probe.predict`` over ``files`` (features computed every call: write=False, nothing cached);
    the model's extractor and runner are built by a first, untimed call."""
    from probe.prediction import predict

    opts = dict(cache=str(cache), write=False, runtime=runtime, batch_size=batch_size, device=cfg.device,
                progress=False)
    if getattr(model, "_bench_warm", None) != runtime:
        predict(model, files[:batch_size], **opts)
        model._bench_warm = runtime
    with h.Stopwatch() as sw:
        res = predict(model, files, **opts)
    assert not res.errors and res.features.stats.runtime == runtime
    return len(files) / sw.seconds


def section(results: dict) -> tuple[str, list[dict]]:
    rows = results.get(NAME) or []
    med = [r for r in rows if r["rep"] == "median"]
    table = [{
        "backbone": r["backbone"], "runtime": r["runtime"], "batch": r["batch_size"],
        "probe.extract img/s": h.fmt(r["extract_ips"]), "vs eager": h.fmt(r["speedup"], 2) + "x",
        "forward only img/s": h.fmt(r["forward_ips"]), "extract / forward": h.fmt(r["ratio"], 2),
        "probe predict img/s": h.fmt(r.get("predict_ips", "")),
        "predict vs eager": (h.fmt(r["predict_speedup"], 2) + "x") if h.num(r.get("predict_speedup")) == h.num(
            r.get("predict_speedup")) else "–",
        "data wait / model (s)": " / ".join(h.fmt(r[k], 2) for k in ("data_wait_s", "model_s")),
        "one-off setup (s)": h.fmt(r["setup_s"], 2),
    } for r in med]
    reps = sorted({r["rep"] for r in rows if r["rep"] != "median"})
    text = [
        "`probe.extract` on PNG files into a cold feature space with each runtime (`runtime=`), next to that "
        "runtime's own forward rate on the same images preloaded as tensors, and `probe predict` (Python API, "
        "`write=False`) on the same files; each runtime at the batch size probe's tuning picks for it, "
        f"{rows[0]['torch_threads'] if rows else '?'} threads, interleaved, medians of {len(reps)} runs. "
        "ONNX Runtime and OpenVINO run the backbone exported to ONNX (opset 17) once and kept in the cache folder; "
        "their features equal eager's within cosine >= 0.9999 and max relative difference <= 1e-3 (checked on "
        "every start), so they share eager's feature space. One-off setup = export (first compiled runtime only) + "
        "building and checking the runner; it is paid once per process (the export once per cache).",
        "",
        h.md_table(table, list(table[0]) if table else []),
    ]
    claims = []
    fast = [r for r in med if r["runtime"] != "eager" and r["backbone"].split("@")[0] == SPEEDUP_BACKBONE]
    if fast:
        best = max(fast, key=lambda r: h.num(r["speedup"]))
        claims.append(h.claim("9 runtime", f"probe.extract with {best['runtime']} vs eager ({best['backbone']})",
                              h.fmt(best["speedup"], 2) + "x", f">= {TARGET_SPEEDUP}x",
                              h.num(best["speedup"]) >= TARGET_SPEEDUP))
        if h.num(best.get("predict_speedup")) == h.num(best.get("predict_speedup")):
            claims.append(h.claim("9 runtime", f"probe predict with {best['runtime']} vs eager ({best['backbone']})",
                                  h.fmt(best["predict_speedup"], 2) + "x", f">= {TARGET_SPEEDUP}x",
                                  h.num(best["predict_speedup"]) >= TARGET_SPEEDUP))
    for r in med:
        if r["runtime"] != "eager":
            claims.append(h.claim("9 runtime", f"probe.extract / forward pass ({r['backbone']}, {r['runtime']})",
                                  h.fmt(r["ratio"], 2), f">= {TARGET_RATIO}", h.num(r["ratio"]) >= TARGET_RATIO))
    return "\n".join(text), claims


def main(argv=None):
    run(h.parse_config(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
