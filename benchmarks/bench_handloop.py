"""Benchmark 2: probe.extract vs the hand-written loop, and a batch size x workers sweep.

The tutorial loop: ``PIL.Image.open -> torchvision transforms (Resize, CenterCrop, ToTensor, Normalize, as in the
backbone's Preprocess) -> unsqueeze -> model -> numpy``, one image at a time, contiguous memory format, no cache.
probe.extract runs with its defaults (workers) and the auto-tuned batch size into a cold cache. The two alternate
``reps`` times on the same files. Then probe.extract is timed at every batch size x workers on a few hundred files
(cold cache each), in a seeded shuffled order so drift on a noisy machine does not favour one corner, next to the
forward pass alone at each batch size. The best cell is compared with probe's defaults.
"""

from __future__ import annotations

import random

import numpy as np

import harness as h
import workload as wl

NAME = "handloop"
GRID = "batch_workers"
TITLE = "2. probe.extract vs the hand-written loop; batch size x workers"
CPU_BATCHES, CPU_WORKERS = (1, 4, 8, 16, 32), (0, 1, 2)
CUDA_BATCHES, CUDA_WORKERS = (32, 64, 128, 256), (0, 2, 4, 8)


def hand_loop(cfg: h.Config, model, files) -> tuple[np.ndarray, float]:
    """The tutorial loop; returns (features, seconds)."""
    import torch
    from PIL import Image
    from torchvision import transforms as T

    pre = model.preprocess
    tf = T.Compose([
        T.Resize(pre.resize, interpolation=T.InterpolationMode(pre.interpolation)),
        T.CenterCrop(pre.crop),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])
    dev, _ = wl.device_and_precision(cfg)
    out = []
    with h.Stopwatch() as sw, torch.no_grad():
        for p in files:
            x = tf(Image.open(p).convert("RGB")).unsqueeze(0).to(dev)
            out.append(model.features(x).cpu().numpy()[0])
    return np.stack(out), sw.seconds


def run(cfg: h.Config) -> None:
    ref = cfg.backbone
    bb, _ = wl.backbone(ref)
    plain, _ = wl.backbone(ref, shared=False)  # the tutorial's model: default (contiguous) memory format
    dev, _ = wl.device_and_precision(cfg)
    plain.module.to(dev)
    bs, _ = wl.tuned_batch_size(cfg, ref)
    files = wl.pool_files(cfg, cfg.sizes.handloop)
    hand_loop(cfg, plain, files[:2])  # warm-up
    rows = []
    for rep in range(cfg.sizes.reps):
        feats, hand_s = hand_loop(cfg, plain, files)
        rows.append({"method": "hand-written loop", "rep": rep + 1, "images": len(files), "batch_size": 1,
                     "workers": 0, "seconds": hand_s, "ips": len(files) / hand_s})
        fs, wall = wl.extract(cfg, files, bb, cfg.work / "handloop" / ref.tag, fresh=True, batch_size=bs)
        diff = float(np.abs(fs.features - feats).max())
        rows.append({"method": "probe.extract", "rep": rep + 1, "images": len(files), "batch_size": bs,
                     "workers": fs.stats.workers, "seconds": wall, "ips": fs.stats.new / wall,
                     "max_abs_feature_diff": diff, **h.stats_columns(fs.stats)})
    hand = h.median(r["ips"] for r in rows if r["method"] == "hand-written loop")
    probe_ips = h.median(r["ips"] for r in rows if r["method"] == "probe.extract")
    rows.append({"method": "speed-up (median probe / median hand)", "rep": "median", "images": len(files),
                 "ips": probe_ips, "hand_ips": hand, "speedup": probe_ips / hand})
    for rep in range(3):  # how stable is probe's own choice? (a new cache folder tunes once)
        tuned, seconds = wl.tune(cfg, ref)
        rows.append({"method": "auto-tuning (fresh memo)", "rep": rep + 1, "batch_size": tuned, "seconds": seconds})
    for r in rows:
        r["backbone"] = str(ref)
    h.write_rows(cfg, NAME, rows)
    h.write_rows(cfg, GRID, grid_rows(cfg, bb, bs, wl.default_workers(cfg)))


def grid_rows(cfg: h.Config, bb, default_bs: int, default_workers: int) -> list[dict]:
    """probe.extract at every batch size x workers (``grid_reps`` passes, each shuffled), then the forward pass
    alone at each batch size."""
    ref = cfg.backbone
    dev, _ = wl.device_and_precision(cfg)
    batches, workers = (CUDA_BATCHES, CUDA_WORKERS) if dev.type == "cuda" else (CPU_BATCHES, CPU_WORKERS)
    files = wl.pool_files(cfg, cfg.sizes.grid)
    rng = random.Random(cfg.seed)
    rows = []
    for rep in range(cfg.sizes.grid_reps):
        cells = [(b, w) for b in batches for w in workers]
        rng.shuffle(cells)
        for b, w in cells:
            fs, wall = wl.extract(cfg, files, bb, cfg.work / "grid" / ref.tag, fresh=True, batch_size=b, workers=w)
            rows.append({"backbone": str(ref), "rep": rep + 1, "batch_size": b, "workers": w, "images": len(files),
                         "ips": fs.stats.new / wall, "seconds": wall,
                         "default": (b, w) == (default_bs, default_workers),
                         **{k: v for k, v in h.stats_columns(fs.stats).items() if k.endswith("_s")}})
    x = wl.preload(bb, files)
    wl.forward_throughput(cfg, bb, x[:max(batches)], max(batches))  # warm-up
    for rep in range(cfg.sizes.grid_reps):
        for b in batches:
            ips, s = wl.forward_throughput(cfg, bb, x, b)
            rows.append({"backbone": str(ref), "rep": rep + 1, "batch_size": b, "workers": "forward only",
                         "images": len(files), "ips": ips, "seconds": s, "default": False})
    rows.sort(key=lambda r: (str(r["workers"]), r["batch_size"], r["rep"]))
    return rows


def grid_cells(grid: list[dict]) -> list[dict]:
    """One row per (batch size, workers) with the median images/s over the passes."""
    cells: dict = {}
    for r in grid:
        cells.setdefault((r["workers"], int(r["batch_size"])), []).append(r)
    return [{**runs[0], "ips": h.median(h.num(r["ips"]) for r in runs), "passes": len(runs)}
            for runs in cells.values()]


def section(results: dict) -> tuple[str, list[dict]]:
    rows = results.get(NAME) or []
    cells = grid_cells(results.get(GRID) or [])
    summary = next((r for r in rows if r["rep"] == "median"), None)
    runs = [r for r in rows if r["method"] in ("hand-written loop", "probe.extract")]
    tunings = [r for r in rows if r["method"].startswith("auto-tuning")]
    table = [{"method": r["method"], "run": r["rep"], "images": r["images"], "batch": r["batch_size"],
              "workers": r["workers"], "img/s": h.fmt(r["ips"]), "seconds": h.fmt(r["seconds"])} for r in runs]
    diffs = [h.num(r.get("max_abs_feature_diff")) for r in runs if r["method"] == "probe.extract"]
    text = [
        "The tutorial loop (PIL open, torchvision Resize/CenterCrop/ToTensor/Normalize from the backbone's "
        "preprocess, unsqueeze, model, numpy; batch of 1, contiguous, `torch.no_grad`) vs `probe.extract` "
        "(auto-tuned batch size, default workers, cold cache) on the same files, alternating."
        + (f" Largest difference between the two loops' features: {h.fmt(max(diffs), 2)}." if diffs else ""),
        "",
        h.md_table(table, list(table[0]) if table else []),
        "",
    ]
    claims = []
    if summary:
        text.append(f"**Speed-up: {h.fmt(summary['speedup'], 3)}x** (median {h.fmt(summary['ips'])} vs "
                    f"{h.fmt(summary['hand_ips'])} img/s, {summary['backbone']}).")
        claims.append(h.claim("2 hand loop", "probe.extract / hand-written loop (img/s)",
                              f"{h.fmt(summary['speedup'], 3)}x", "report", None))
    if tunings:
        picks = ", ".join(r["batch_size"] for r in tunings)
        text.append(f"\nprobe's batch-size auto-tuning (`probe.tuning`, fresh memo each time) picked batch "
                    f"{picks} in {len(tunings)} tries ({h.fmt(h.median(h.num(r['seconds']) for r in tunings))} s "
                    "each); the runs above use the first pick.")
    best = max((c for c in cells if c["workers"] != "forward only"), key=lambda c: c["ips"], default=None)
    default = next((c for c in cells if c["default"] == "yes"), None)
    if cells:
        batches = sorted({int(c["batch_size"]) for c in cells})
        pivot = []
        for w in dict.fromkeys(c["workers"] for c in cells):
            line = {"workers": w if w == "forward only" else f"{w} worker" + ("" if w == "1" else "s")}
            for b in batches:
                cell = next((c for c in cells if c["workers"] == w and int(c["batch_size"]) == b), None)
                mark = (" (default)" if cell and cell is default else "") + (" **best**" if cell is best else "")
                line[f"batch {b}"] = (h.fmt(cell["ips"]) + mark) if cell else ""
            pivot.append(line)
        text += ["", f"`probe.extract` images/s by batch size and loader workers ({cells[0]['images']} files per "
                     f"run, cold cache each; median of {cells[0]['passes']} passes over the grid, each in a new "
                     "shuffled order); the last row is the forward pass alone on preloaded tensors. "
                     "Plot: `results/throughput_vs_batch.png`.", "",
                 h.md_table(pivot, list(pivot[0])), ""]
    if best and default:
        ratio = default["ips"] / best["ips"]
        same = best is default
        text.append(f"Best on this machine: batch {best['batch_size']}, {best['workers']} workers "
                    f"({h.fmt(best['ips'])} img/s). probe's defaults (auto-tuned batch {default['batch_size']}, "
                    f"{default['workers']} workers) give {h.fmt(default['ips'])} img/s = {h.fmt(ratio, 2)} of the "
                    f"best; {'the same cell' if same else 'a different cell'}.")
        where = "same cell" if same else f"best: batch {best['batch_size']}, {best['workers']} workers"
        claims.append(h.claim("2 batch x workers", "probe's defaults vs the best cell (img/s)",
                              f"{h.fmt(ratio, 2)} ({where})", ">= 0.9 of the best", ratio >= 0.9))
    return "\n".join(text), claims


def main(argv=None):
    run(h.parse_config(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
