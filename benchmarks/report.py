"""Build benchmarks/README.md and the throughput plot from the result files (no measuring here).

    python benchmarks/report.py [--out RESULTS_DIR] [--readme PATH]

regenerates the README from whatever result files are in RESULTS_DIR; ``run_all.py`` calls :func:`build` after
running the benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

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

BENCHMARKS = (bench_throughput, bench_handloop, bench_refit, bench_incremental, bench_sweep, bench_accuracy,
              bench_memory, bench_photos, bench_runtime, bench_ray, bench_shift, bench_serve)
RUN_FILE = "run.json"
PLOT = "throughput_vs_batch.png"
#: The project README's results table lives between these markers and is rewritten from the result files.
BEGIN, END = "<!-- benchmark-results:begin -->", "<!-- benchmark-results:end -->"


def load_results(out: Path) -> dict[str, list[dict]]:
    return {p.stem: h.read_rows(p) for p in sorted(Path(out).glob("*.csv"))}


def plot_throughput(grid: list[dict], path: Path) -> Path | None:
    """images/s vs batch size, one line per loader-workers setting plus the forward pass alone (medians)."""
    if not grid:
        return None
    grid = bench_handloop.grid_cells(grid)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for w in dict.fromkeys(r["workers"] for r in grid):
        pts = sorted((int(r["batch_size"]), h.num(r["ips"])) for r in grid if r["workers"] == w)
        label = ("forward pass only (preloaded tensors)" if w == "forward only"
                 else f"probe.extract, {w} worker" + ("" if w == "1" else "s"))
        style = dict(linestyle="--", color="black") if w == "forward only" else dict(marker="o")
        ax.plot([b for b, _ in pts], [v for _, v in pts], label=label, **style)
    default = next((r for r in grid if r["default"] == "yes"), None)
    if default:
        ax.plot([int(default["batch_size"])], [h.num(default["ips"])], marker="*", markersize=14, color="red",
                linestyle="none", label="probe defaults")
    ax.set_xscale("log", base=2)
    batches = sorted({int(r["batch_size"]) for r in grid})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    first = grid[0]
    ax.set_title(f"{first['backbone']}, {first['images']} PNG files, {first['device']}, "
                 f"{first['torch_threads']} threads", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _sections(results: dict, run: dict) -> tuple[list[str], list[dict]]:
    sections, claims = [], []
    for bench in BENCHMARKS:
        if not any(name in results for name in (bench.NAME, getattr(bench, "GRID", None))):
            sections.append(f"## {bench.TITLE}\n\nNo result file in this run.\n")
            continue
        text, cl = bench.section(results)
        claims += cl
        status = run.get("benchmarks", {}).get(bench.NAME, {})
        took = f" ({h.fmt(status['seconds'])} s)" if status.get("seconds") else ""
        failed = f"\n\n**This benchmark failed in the last run:** `{status['error']}`" if status.get("error") else ""
        sections.append(f"## {bench.TITLE}{took}\n\n{text}{failed}\n")
    return sections, claims


def _claims_table(claims: list[dict]) -> str:
    return h.md_table(claims, {"benchmark": "benchmark", "claim": "claim", "measured": "measured",
                               "target": "target", "met": "met"}) if claims else "No results yet."


def results_block(out: Path = h.RESULTS_DIR) -> str:
    """The project README's results block: where and when the numbers were measured, and the summary table,
    made from the result files alone."""
    out = Path(out)
    results = load_results(out)
    run = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).exists() else {}
    _, claims = _sections(results, run)
    first = next(iter(results.values()), [{}])[0] if results else {}
    return "\n".join([
        BEGIN,
        f"Measured by `{run.get('command', '?')}` ({h.fmt(run.get('seconds'))} s) on {run.get('started', '?')} UTC: "
        f"{first.get('cpu_count', '?')} CPUs ({first.get('cpu_model', '?')}), device {first.get('device', '?')}, "
        f"torch {first.get('torch_version', '?')} with {first.get('torch_threads', '?')} threads, git "
        f"{first.get('git_commit', '?')}; scale {run.get('scale', '?')}, data {first.get('data', '?')}. "
        "Generated from `benchmarks/results/` by `benchmarks/report.py` (details: "
        "[benchmarks/README.md](benchmarks/README.md)).",
        "",
        _claims_table(claims),
        END,
    ])


def update_project_readme(out: Path = h.RESULTS_DIR, readme: Path = h.REPO_ROOT / "README.md") -> Path | None:
    """Rewrite the block between the markers in the project README from the result files (if it has one)."""
    text = Path(readme).read_text()
    if BEGIN not in text or END not in text:
        return None
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + results_block(out) + text[end:]
    if new != text:
        tmp = Path(readme).with_name(f".tmp-{os.getpid()}-{Path(readme).name}")
        tmp.write_text(new)
        os.replace(tmp, readme)
    return Path(readme)


def build(out: Path, readme: Path) -> Path:
    out, readme = Path(out), Path(readme)
    results = load_results(out)
    run = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).exists() else {}
    plot = plot_throughput(results.get(bench_handloop.GRID, []), out / PLOT)
    sections, claims = _sections(results, run)
    any_rows = next(iter(results.values()), [{}])
    first = any_rows[0] if any_rows else {}
    rel = os.path.relpath(out, readme.parent)
    head = [
        "# probe benchmarks",
        "",
        "Generated by `benchmarks/run_all.py` (`make bench`) from the result files in "
        f"`{rel}/` — do not edit by hand; rerun, or `python benchmarks/report.py` to rebuild from the files. "
        "Every claim is a ratio of two things measured side by side in the same run on the same machine. "
        "Where a target is missed, the number still goes in the table.",
        "",
        f"* command: `{run.get('command', '?')}` — took {h.fmt(run.get('seconds'))} s",
        f"* date: {run.get('started', first.get('date', '?'))} (UTC)",
        f"* machine: {first.get('cpu_count', '?')} CPUs ({first.get('cpu_model', '?')}), device "
        f"{first.get('device', '?')}, torch {first.get('torch_version', '?')} with {first.get('torch_threads', '?')} "
        f"threads, Python {first.get('python', '?')}, git {first.get('git_commit', '?')}",
        f"* scale: {run.get('scale', first.get('scale', '?'))} ({run.get('sizes', '')}); data: "
        f"{first.get('data', '?')}; backbones: {run.get('backbone', '?')} (features), "
        f"{run.get('speed_backbone', '?')} (speed only)",
        "",
        "Run it: `make bench` (default sizes; 6-15 min on 2 CPU cores depending on load), "
        "`python benchmarks/run_all.py --quick` (smoke), `--full` (60k/10k Fashion-MNIST and larger speed runs, "
        "for a GPU machine), `--only refit,sweep` to run some; every `benchmarks/bench_*.py` also runs on its own "
        "with the same options.",
        "",
        "## Summary",
        "",
        _claims_table(claims),
        "",
    ]
    if plot:
        head += [f"![throughput vs batch size]({rel}/{PLOT})", ""]
    text = "\n".join(head) + "\n" + "\n".join(sections)
    readme.parent.mkdir(parents=True, exist_ok=True)
    tmp = readme.with_name(f".tmp-{os.getpid()}-{readme.name}")
    tmp.write_text(text)
    os.replace(tmp, readme)
    if out.resolve() == h.RESULTS_DIR.resolve():  # the committed results: the project README follows them
        update_project_readme(out)
    return readme


def main(argv=None):
    p = argparse.ArgumentParser(description="Rebuild benchmarks/README.md from result files.")
    p.add_argument("--out", type=Path, default=h.RESULTS_DIR)
    p.add_argument("--readme", type=Path, default=None, help="Default: benchmarks/README.md for the default --out, "
                                                             "else README.md inside --out.")
    args = p.parse_args(argv)
    readme = args.readme or (h.README if args.out.resolve() == h.RESULTS_DIR else args.out / "README.md")
    print(build(args.out, readme))


if __name__ == "__main__":
    main()
