"""Run every benchmark, then rebuild benchmarks/README.md and the plot from the result files (`make bench`).

    python benchmarks/run_all.py            # default sizes: ~15 minutes on 2 CPU cores
    python benchmarks/run_all.py --quick    # a few minutes
    python benchmarks/run_all.py --full     # the real sizes, for a GPU machine
    python benchmarks/run_all.py --scale tiny --backbone test:tiny-cnn --speed-backbone test:tiny-cnn \\
        --data generated --out /tmp/results --work /tmp/work          # the smoke test

Benchmarks run in this process, in an order that lets them share work: ``refit`` extracts the shared subset into
a cold cache first, and ``sweep``, ``accuracy`` and ``memory`` read those cached features. A failing benchmark is
recorded in ``run.json`` and the README and does not stop the others (the exit status is then 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import sys
import time
import traceback

import bench_accuracy
import bench_handloop
import bench_incremental
import bench_memory
import bench_photos
import bench_ray
import bench_refit
import bench_runtime
import bench_serve
import bench_shift
import bench_sweep
import bench_throughput
import harness as h
import report

# refit first: its cold run fills the shared cache that sweep, accuracy and memory read.
ORDER = (bench_refit, bench_sweep, bench_accuracy, bench_memory, bench_throughput, bench_handloop, bench_incremental,
         bench_photos, bench_runtime, bench_ray, bench_shift, bench_serve)

log = logging.getLogger("benchmarks")


def main(argv=None) -> int:
    p = h.add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--only", default=None,
                   help=f"Comma-separated subset of: {', '.join(b.NAME for b in ORDER)}.")
    p.add_argument("--readme", default=None, help="README to write (default: benchmarks/README.md for the default "
                                                  "--out, else README.md inside --out).")
    args = p.parse_args(argv)
    cfg = h.config_from_args(args, argv)
    only = [s.strip() for s in args.only.split(",")] if args.only else [b.NAME for b in ORDER]
    unknown = set(only) - {b.NAME for b in ORDER}
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}")
    readme = args.readme or (h.README if cfg.out == h.RESULTS_DIR else cfg.out / "README.md")

    cfg.out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.perf_counter()
    status = {}
    for bench in ORDER:
        if bench.NAME not in only:
            continue
        log.info("== %s", bench.TITLE)
        b0 = time.perf_counter()
        try:
            bench.run(cfg)
            status[bench.NAME] = {"seconds": round(time.perf_counter() - b0, 1)}
        except Exception as e:  # one broken benchmark must not lose the others' results
            traceback.print_exc()
            status[bench.NAME] = {"seconds": round(time.perf_counter() - b0, 1), "error": f"{type(e).__name__}: {e}"}
        log.info("== %s done in %.1f s", bench.NAME, time.perf_counter() - b0)
    previous = cfg.out / report.RUN_FILE
    if args.only and previous.exists():  # a partial rerun keeps the other benchmarks' status
        status = {**json.loads(previous.read_text()).get("benchmarks", {}), **status}
    run = {
        "command": cfg.command, "started": started, "seconds": round(time.perf_counter() - t0, 1),
        "scale": cfg.scale, "sizes": ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg.sizes).items()),
        "backbone": str(cfg.backbone), "speed_backbone": str(cfg.speed_backbone), "data": cfg.source.name,
        "benchmarks": status, "machine": h.machine_info(cfg),
    }
    tmp = cfg.out / f".tmp-{os.getpid()}-{report.RUN_FILE}"
    tmp.write_text(json.dumps(run, indent=2) + "\n")
    os.replace(tmp, cfg.out / report.RUN_FILE)
    path = report.build(cfg.out, readme)
    log.info("all done in %.1f s; README: %s", run["seconds"], path)
    return 1 if any("error" in s for s in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
