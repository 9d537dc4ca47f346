"""The benchmark harness: run configuration, machine info, result files, timing, peak RSS, markdown.

Every benchmark script imports this module and :mod:`workload` (``python benchmarks/bench_x.py`` puts
``benchmarks/`` on sys.path), so nothing is written twice:

* :func:`parse_config` — the shared command line (``--scale``, ``--backbone``, ``--data``, ``--out``, ``--work``...);
* :func:`machine_info` — cpu count/model, torch version and threads, device, date, git commit (a column of
  every result row);
* :func:`write_rows` / :func:`read_rows` — atomic CSV result files under ``--out``;
* :class:`Stopwatch`, :func:`median`, :func:`stats_columns` — wall-clock timing and probe's own time split;
* :func:`peak_rss` — peak resident memory of a fresh Python subprocess (its VmHWM);
* :func:`md_table`, :func:`fmt`, :func:`claim` — the README's tables.

The benchmarks only use probe's public API: ``probe.extract`` / ``Extractor`` / ``fit``, ``probe.datasets``,
``probe.tuning``, ``probe.heads``, ``probe.metrics``, ``probe.FeatureCache``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger("benchmarks")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
README = REPO_ROOT / "benchmarks" / "README.md"
WORK_DIR = REPO_ROOT / "build" / "bench"


# -- sizes and configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How many images each benchmark uses at one scale."""

    train: int  # shared Fashion-MNIST subset (benchmarks 3, 5, 6, 7): training images
    test: int  # ... and held-out test images
    throughput: int  # images per extraction run in benchmark 1
    reps: int  # interleaved repetitions of the cheap side-by-side measurements
    handloop: int  # images per run in benchmark 2 (hand-written loop vs probe.extract)
    grid: int  # images per (batch size, workers) configuration in benchmark 2
    grid_reps: int  # passes over the batch size x workers grid (each in a new shuffled order)
    incremental: int  # files of the first extraction in benchmark 4 (then 10 % are added)
    memory: int  # N of benchmark 7 (N and 4N inputs)
    exhaustive: int = 45  # C values of the exhaustive grid in benchmark 5
    photos: int = 48  # camera-sized (3000x2000) JPEGs of benchmark 8

    @property
    def pool(self) -> int:
        """Files of the speed pool: enough for every speed benchmark."""
        return max(self.throughput, self.handloop, self.grid, 4 * self.memory,
                   self.incremental + max(1, self.incremental // 10))


SCALES = {
    # the smoke test: a handful of images (use with --backbone test:tiny-cnn)
    "tiny": Sizes(train=100, test=40, throughput=16, reps=1, handloop=8, grid=8, grid_reps=1, incremental=20,
                  memory=8, exhaustive=9, photos=6),
    # a quick real run (~2-3 minutes with EfficientNet-Lite0 on 2 cores)
    "quick": Sizes(train=400, test=200, throughput=64, reps=2, handloop=32, grid=32, grid_reps=1, incremental=100,
                   memory=32, photos=24),
    # `make bench`: ~15 minutes on 2 CPU cores
    "default": Sizes(train=3000, test=1000, throughput=256, reps=3, handloop=128, grid=128, grid_reps=2,
                     incremental=500, memory=200),
    # --full: the real sizes, for a GPU machine
    "full": Sizes(train=60000, test=10000, throughput=5000, reps=3, handloop=1000, grid=2000, grid_reps=2,
                  incremental=10000, memory=5000, photos=400),
}


@dataclass(frozen=True)
class BackboneRef:
    """A backbone name plus optional weights (``tv:resnet18@random`` = weights "random")."""

    name: str
    weights: str | None = None

    @classmethod
    def parse(cls, text: str) -> "BackboneRef":
        name, _, weights = text.partition("@")
        return cls(name, weights or None)

    def __str__(self) -> str:
        return self.name + (f"@{self.weights}" if self.weights else "")

    @property
    def tag(self) -> str:
        """A file-name-safe form."""
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(self))


@dataclass(frozen=True)
class Config:
    scale: str
    sizes: Sizes
    backbone: BackboneRef  # features that mean something: accuracy, refit, sweep, memory, throughput
    speed_backbone: BackboneRef  # speed-only measurements (incremental; second row of throughput)
    data: str  # auto | fashion-mnist | generated
    out: Path  # result files
    work: Path  # images, caches
    device: str | None
    seed: int = 0
    command: str = ""

    @property
    def source(self):
        """The resolved :class:`workload.ImageSource` (``auto`` becomes Fashion-MNIST or generated)."""
        from workload import image_source  # workload imports this module

        return image_source(self.data)

    def results(self, name: str, suffix: str = ".csv") -> Path:
        return self.out / f"{name}{suffix}"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--scale", choices=sorted(SCALES), default="default",
                      help="Benchmark sizes (default: 6-15 minutes on 2 CPU cores, depending on load).")
    size.add_argument("--quick", dest="scale", action="store_const", const="quick", help="Same as --scale quick.")
    size.add_argument("--full", dest="scale", action="store_const", const="full",
                      help="Same as --scale full: the real sizes (60k/10k Fashion-MNIST), for a GPU machine.")
    p.add_argument("--backbone", default="efficientnet-lite0",
                   help="Backbone for features and accuracy (NAME or NAME@WEIGHTS; test:tiny-cnn for smoke tests).")
    p.add_argument("--speed-backbone", default="tv:resnet18@random",
                   help="Backbone for speed-only measurements (default: tv:resnet18 with a seeded random init).")
    p.add_argument("--data", choices=("auto", "fashion-mnist", "generated"), default="auto",
                   help="Image source: Fashion-MNIST (auto: when installed) or generated class-patterned images.")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="Folder for the result files.")
    p.add_argument("--work", type=Path, default=WORK_DIR, help="Work folder for images and feature caches.")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="Log probe's INFO messages.")
    return p


def config_from_args(args: argparse.Namespace, argv: Sequence[str] | None = None) -> Config:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else list(argv)
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "run_all.py"
    return Config(
        scale=args.scale, sizes=SCALES[args.scale], backbone=BackboneRef.parse(args.backbone),
        speed_backbone=BackboneRef.parse(args.speed_backbone), data=args.data, out=args.out.resolve(),
        work=args.work.resolve(), device=args.device, seed=args.seed,
        command=" ".join(["python", f"benchmarks/{script}", *argv]),
    )


def parse_config(description: str, argv: Sequence[str] | None = None) -> Config:
    p = add_arguments(argparse.ArgumentParser(description=description))
    return config_from_args(p.parse_args(argv), argv)


# -- machine info --------------------------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=None)
def _static_machine_info(device: str | None) -> tuple:
    import torch

    from probe.engine import resolve_device

    dev = resolve_device(device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(dev) + (f" ({gpu})" if gpu else ""),
        "python": platform.python_version(),
        "git_commit": _git_commit(),
    }
    return tuple(info.items())


def machine_info(cfg: Config) -> dict:
    """Columns added to every result row: where and when it was measured."""
    info = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    info.update(dict(_static_machine_info(cfg.device)))
    info["scale"] = cfg.scale
    info["data"] = cfg.source.name
    return info


MACHINE_COLUMNS = ("date", "cpu_count", "cpu_model", "torch_version", "torch_threads", "device", "python",
                   "git_commit", "scale", "data")


# -- result files --------------------------------------------------------------------------------------------


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    if isinstance(v, np.integer):
        return str(int(v))
    return str(v)


def write_rows(cfg: Config, name: str, rows: Sequence[dict]) -> Path:
    """Write ``rows`` (plus the machine-info columns) to ``<out>/<name>.csv`` atomically; returns the path."""
    info = machine_info(cfg)
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    columns += [k for k in MACHINE_COLUMNS if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(v) for k, v in {**info, **r}.items()})
    path = cfg.results(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
    log.info("wrote %s (%d rows)", path, len(rows))
    return path


def read_rows(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(value, default=float("nan")) -> float:
    """A CSV cell as float (NaN when empty)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


# -- timing --------------------------------------------------------------------------------------------------


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        return False


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def stats_columns(stats) -> dict:
    """The ExtractStats of a run as result columns."""
    s = stats.seconds
    return {
        "new": stats.new, "cached": stats.cached, "files_hashed": stats.files_hashed,
        "model_batches": stats.model_batches, "batch_size": stats.batch_size, "workers": stats.workers,
        "hash_s": s["hash"], "tune_s": s["tune"], "data_wait_s": s["data_wait"], "model_s": s["model"],
        "write_s": s["write"],
        "total_s": s["total"],
    }


# -- memory --------------------------------------------------------------------------------------------------


@dataclass
class ProcessRun:
    peak_rss_mb: float
    seconds: float
    returncode: int
    output: str = field(repr=False, default="")


# Runs a module (-m NAME ARGS) or code (-c CODE) and, at exit, writes the process's own peak RSS (VmHWM, KiB).
# VmHWM belongs to the address space made by exec, unlike ru_maxrss (from wait4 or getrusage), which Linux
# carries over from the forked copy of the parent: a child of a 1.5 GB benchmark process would report 1.5 GB.
_RSS_LAUNCHER = """
import atexit, resource, runpy, sys
out, mode, target = sys.argv[1:4]
def report():
    try:
        with open("/proc/self/status") as f:
            kib = int(next(line for line in f if line.startswith("VmHWM")).split()[1])
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: the best there is
    with open(out, "w") as f:
        f.write(str(kib))
atexit.register(report)
sys.argv = [target] + sys.argv[4:]
if mode == "-m":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    exec(compile(target, "<benchmark>", "exec"), {"__name__": "__main__"})
"""


def peak_rss(mode: str, target: str, args: Sequence[str] = (), cwd: str | os.PathLike | None = None,
             env: dict | None = None) -> ProcessRun:
    """Run ``python -m TARGET ARGS`` (``mode="-m"``) or ``python -c TARGET`` (``mode="-c"``) in a fresh process
    and return its peak resident set size (the main process; loader worker processes are not counted)."""
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "rb") as stdin, \
            open(os.path.join(tmp, "output"), "w+b") as out:
        report = os.path.join(tmp, "peak-kib")
        cmd = [sys.executable, "-c", _RSS_LAUNCHER, report, mode, target, *args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdin=stdin, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                              env={**os.environ, **(env or {})})
        seconds = time.perf_counter() - t0
        out.seek(0)
        text = out.read().decode(errors="replace")
        kib = int(Path(report).read_text()) if os.path.exists(report) else float("nan")
    return ProcessRun(kib / 1024.0, seconds, proc.returncode, text)


# -- markdown ------------------------------------------------------------------------------------------------


def md_table(rows: Sequence[dict], columns: Sequence[str] | dict) -> str:
    """A markdown table of ``rows``; ``columns`` is a list of keys or a {key: header} dict."""
    if not isinstance(columns, dict):
        columns = {c: c for c in columns}
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_md_cell(r.get(k, "")) for k in columns) + " |")
    return "\n".join(lines)


def _md_cell(v) -> str:
    if isinstance(v, float):
        v = fmt(v)
    return str(v).replace("|", "\\|")


def fmt(x, digits: int = 3) -> str:
    """A number for a table: ``digits`` significant digits, no exponent for ordinary magnitudes."""
    x = num(x)
    if x != x:
        return "–"
    if x == 0:
        return "0"
    mag = abs(x)
    if mag >= 10 ** digits:
        return f"{x:,.0f}"
    if mag >= 1e-3:
        decimals = max(0, digits - 1 - int(np.floor(np.log10(mag))))
        return f"{x:.{decimals}f}"
    return f"{x:.2g}"


def claim(benchmark: str, what: str, measured: str, target: str, met: bool | None) -> dict:
    """One row of the README's summary table."""
    return {"benchmark": benchmark, "claim": what, "measured": measured, "target": target,
            "met": "–" if met is None else ("yes" if met else "**no**")}
