"""The ``probe`` command line: parsing and printing only; every command calls the Python API.

Expected failures (ProbeError) become one-line messages and exit status 1, never tracebacks.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .defaults import DEFAULT_BACKBONE, DEFAULT_CACHE, POOLINGS, RUNTIMES
from .errors import ProbeError


class ProbeGroup(click.Group):
    """Expected failures become one line on stderr and exit 1; with -v an OS error keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ProbeError as e:
            raise click.ClickException(_one_line(str(e))) from e
        except OSError as e:  # a folder that cannot be written, a disk that is full, ...
            if _verbosity(ctx) > 0:
                raise
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from e
        except KeyboardInterrupt:
            click.echo("interrupted; finished segments are kept in the cache, rerun to resume", err=True)
            sys.exit(130)


def _verbosity(ctx) -> int:
    root = ctx.find_root()
    return (root.params or {}).get("verbose") or 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


@click.group(cls=ProbeGroup)
@click.version_option(package_name="probe")
@click.option("-v", "--verbose", count=True, help="-v for progress details, -vv for debug logging.")
def cli(verbose):
    """probe: frozen-backbone features, cached once, and linear probes on top."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# -- shared options ------------------------------------------------------------------------------------------


def backbone_options(f):
    return _apply(f, [
        click.option("--backbone", "-b", default=DEFAULT_BACKBONE, show_default=True,
                     help="Registry name (see `probe backbones`)."),
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="Local weights file (state_dict); its sha256 enters the cache identity."),
        click.option("--layer", default=None, help="Take this named submodule's output instead of the penultimate."),
        click.option("--pooling", type=click.Choice(POOLINGS), default=None, help="Reduce a --layer output."),
    ])


def _apply(f, opts):
    for opt in reversed(opts):
        f = opt(f)
    return f


def compute_options(f):
    """How extraction runs: device, precision, batching, workers, limits, progress, runtime."""
    return _apply(f, [
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
        click.option("--amp", type=click.Choice(["auto", "off", "bf16", "fp16"]), default="auto", show_default=True,
                     help="Mixed precision (auto: bf16/fp16 on CUDA, off on CPU)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Override the per-device (auto-tuned) batch size."),
        click.option("--workers", type=click.IntRange(min=0), default=None,
                     help="Decode/preprocess worker processes (default: 0 on small CPUs, more with a GPU)."),
        click.option("--max-pixels", type=click.IntRange(min=1), default=None,
                     help="Refuse larger images (decompression-bomb guard)."),
        click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a terminal)."),
        click.option("--runtime", type=click.Choice(RUNTIMES), default="auto",
                     show_default=True,
                     help="What runs the backbone: eager PyTorch, or ONNX Runtime / OpenVINO on the CPU "
                          "(pip install 'probe[fast]'); auto measures once and keeps the fastest."),
    ])


def engine_options(f):
    """Where features are stored, plus :func:`compute_options`."""
    return _apply(compute_options(f), [
        click.option("--cache", type=click.Path(file_okay=False), default=DEFAULT_CACHE,
                     show_default=True, help="Feature cache folder."),
        click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
                     help="Storage dtype of cached features."),
        click.option("--decode", type=click.Choice(["exact", "reduced"]), default=None,
                     help="JPEG decoding: reduced = libjpeg's DCT scaling, 4-6x faster on photos, within a stated "
                          "tolerance (default: the backbone's; its own cache space)."),
    ])


def extract_options(o: dict, **fixed):
    """The :class:`~probe.options.ExtractOptions` named by the parsed options (the decorators above use the
    options' own field names); consumed options are removed from ``o``."""
    from .options import ExtractOptions

    picked = {name: o.pop(name) for name in ExtractOptions.names() if name in o}
    return ExtractOptions.from_kwargs(**picked, **fixed)


# -- commands ------------------------------------------------------------------------------------------------


@cli.command()
@click.option("--all", "show_all", is_flag=True, help="Also list every torchvision architecture.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: a JSON list of objects.")
def backbones(show_all, as_json):
    """List backbones with their output dim and weights status."""
    import json

    from .backbones import listing

    rows, hidden = listing(show_all)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        dim = f"{r['dim']:5d}-d" if r["dim"] else "    ?  "
        click.echo(f"{r['name']:24s} {dim}  {r['weights']:34s} {r['description']}")
    if hidden:
        click.echo(f"... and {hidden} more torchvision models (`probe backbones --all`)")


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@backbone_options
@engine_options
@click.option("--strict", is_flag=True, help="Exit non-zero if any input failed (after extracting the rest).")
@click.option("--segment-rows", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Rows per cache segment (a killed run loses at most one open segment).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Machine-readable JSON run report (default: <cache>/last-extract.json).")
def extract(inputs, strict, report_path, **o):
    """Extract features of INPUTS (folders, CSV/TSV files, image files) into the cache."""
    from .engine import extract as run_extract
    from .featureset import RUN_REPORT_FILE, write_run_report

    opts = extract_options(o)
    fs = run_extract(list(inputs), opts)
    report = write_run_report(report_path or Path(opts.cache) / RUN_REPORT_FILE, fs)
    click.echo(f"space {fs.space.id} ({fs.space.backbone}, {fs.space.dim}-d) in {opts.cache}")
    click.echo(fs.stats.summary())
    for f in fs.failures:
        click.echo(f"  failed: {f.error}")
    if fs.failures:
        click.echo(f"failures listed in {report}")
    if strict and fs.failures:
        raise click.ClickException(f"--strict: {len(fs.failures)} inputs failed")


def _model_options(f):
    f = click.option("--trust", is_flag=True, help="Allow loading a head stored as a pickle (runs code!).")(f)
    f = click.option("--ignore-versions", is_flag=True, help="Load a head saved with another scikit-learn.")(f)
    return f


def _load_model(path, o):
    from .model import load

    return load(path, trust=o.pop("trust"), check_versions=not o.pop("ignore_versions"))


def _compute_kwargs(o: dict) -> dict:
    """Speed options (:func:`compute_options`) for a model's extractor, checked by ExtractOptions."""
    opts = extract_options(o)
    return {name: getattr(opts, name) for name in ("device", "amp", "batch_size", "workers", "max_pixels",
                                                     "progress")}


@cli.command()
@click.argument("data", nargs=-1, required=True, type=click.Path())
@click.option("--clf", default="logreg", show_default=True,
              help="logreg, linear-svm, ridge, knn, sgd, mlp, or an import path like sklearn.ensemble.RandomForestClassifier.")
@click.option("--params", default=None, help="JSON object of head parameters, e.g. '{\"max_iter\": 500}'.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="model.probe", show_default=True,
              help="Model file; metrics.json and confusion_matrix.png are written next to it.")
@click.option("--val", type=click.Path(), default=None, help="Validation data (folder / CSV) for the sweep.")
@click.option("--val-split", type=click.FloatRange(0, 0.9), default=0.1, show_default=True,
              help="Held-out fraction when --val is not given (stratified, seeded; 0 disables).")
@click.option("--C", "C", type=float, default=None, help="Use this C and skip the sweep.")
@click.option("--alpha", type=float, default=None, help="Use this alpha (ridge, sgd, mlp) and skip the sweep.")
@click.option("--standardize", is_flag=True, help="Standardize features in the head pipeline.")
@click.option("--l2-normalize", is_flag=True, help="L2-normalize features in the head pipeline.")
@click.option("--no-extract", is_flag=True, help="Refuse to extract: every input must already be cached.")
@click.option("--strict", is_flag=True, help="Fail on bad inputs and on train/validation leakage.")
@click.option("--seed", type=int, default=0, show_default=True)
@backbone_options
@engine_options
def fit(data, clf, params, output, val, val_split, C, alpha, standardize, l2_normalize, no_extract, strict, seed, **o):
    """Train a head on the cached features of DATA (labelled folder / CSV) and save a composed model."""
    import json

    from .training import fit as run_fit

    if C is not None and alpha is not None:
        raise click.UsageError("give --C or --alpha, not both")
    try:
        head_params = json.loads(params) if params else None
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON ({e})", param_hint="--params") from e
    if head_params is not None and not isinstance(head_params, dict):
        raise click.BadParameter(f"must be a JSON object of parameter names to values, got {params}",
                                 param_hint="--params")
    opts = extract_options(o)
    res = run_fit(
        list(data) if len(data) > 1 else data[0], clf, backbone=opts, val=val,
        val_split=val_split, value=C if C is not None else alpha, params=head_params, standardize=standardize,
        l2_normalize=l2_normalize, extract_missing=not no_extract, strict=strict, seed=seed, output=output,
    )
    click.echo(f"features: {res.metrics['inputs_cached']} cached, {res.metrics['inputs_extracted']} extracted "
               f"({res.model.backbone_['name']}, space {res.model.backbone_['space_digest'][:16]})")
    for leak in res.leakage:
        click.echo(f"leakage: {leak.other_path} has the same bytes as training input {leak.train_path}")
    click.echo(res.report)
    click.echo(f"model saved to {res.path}; report in {res.files['metrics']} and {res.files['confusion_matrix']}")


@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("data", nargs=-1, required=True, type=click.Path())
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help=f"Read cached features here and store new ones (default: read {DEFAULT_CACHE}/, write nothing).")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), default=None,
              help="Write metrics.json and confusion_matrix.png here.")
@click.option("--strict", is_flag=True, help="Fail on bad inputs and on overlap with the training data.")
@compute_options
@_model_options
def evaluate(model, data, cache, output_dir, strict, **o):
    """Report accuracy, balanced accuracy, macro-F1, top-5, ECE and per-class scores of MODEL on DATA."""
    from .training import evaluate as run_evaluate

    m = _load_model(model, o)
    res = run_evaluate(m, list(data), cache=cache or DEFAULT_CACHE, write=cache is not None,
                       strict=strict, output_dir=output_dir, **_compute_kwargs(o))
    click.echo(res.report)
    if res.leakage:
        click.echo(f"leakage: {len(res.leakage)} inputs were in the training data (e.g. {res.leakage[0].other_path})")


@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write here (atomically) instead of stdout.")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help=f"Read cached features here and store new ones (default: read {DEFAULT_CACHE}/, write nothing).")
@click.option("--evaluate", "show_eval", is_flag=True, help="Inputs carry labels: print the evaluation to stderr.")
@click.option("--strict", is_flag=True, help="Exit non-zero when any input failed (rows are still written).")
@compute_options
@_model_options
def predict(model, inputs, fmt, top_k, output, cache, show_eval, strict, **o):
    """Predict classes of INPUTS (files, folders, CSVs; `-` reads paths from stdin) with MODEL."""
    from .files import check_output_target
    from .prediction import predict as run_predict
    from .prediction import save_predictions, write_predictions
    from .sources import Record, resolve
    from .training import evaluate_features

    if output:
        check_output_target(output)  # refuse a symlink / device target before any work
    m = _load_model(model, o)
    records = []
    for item in inputs:
        if item == "-":  # one path per line, each taken as a file: a bad line becomes an error row
            records.extend(Record(line.rstrip("\r\n")) for line in sys.stdin if line.strip())
        else:
            records.extend(resolve(item))
    res = run_predict(m, records, cache=cache or DEFAULT_CACHE, write=cache is not None, top_k=top_k,
                      **_compute_kwargs(o))
    if output:
        save_predictions(res, output, fmt)
    else:
        write_predictions(res, sys.stdout, fmt)
    if show_eval:
        if any(lab is None for lab in res.features.labels):
            raise click.ClickException("--evaluate needs labelled inputs (class folders or a label column)")
        click.echo(evaluate_features(m, res.features).report, err=True)
    for r in res.errors:
        click.echo(f"failed: {r.error}", err=True)
    if strict and res.errors:
        raise click.ClickException(f"--strict: {len(res.errors)} of {len(res.rows)} inputs failed")


@cli.group(cls=ProbeGroup)
def cache():
    """Inspect and maintain feature caches."""


def _cache_option(f):
    return click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=DEFAULT_CACHE,
                        show_default=True, help="Feature cache folder.")(f)


@cache.command("info")
@_cache_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: a JSON list of spaces.")
def cache_info(cache_dir, as_json):
    """List feature spaces: backbone, rows, segments, size on disk."""
    import json

    from .cache import FeatureCache

    rows = FeatureCache(cache_dir).summary()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"{cache_dir}: no feature spaces")
        return
    click.echo(f"{'space':16s}  {'backbone':22s} {'layer':12s} {'dim':>5s} {'dtype':8s} {'rows':>8s} {'segs':>5s} {'MiB':>8s}")
    for r in rows:
        sp = r["space"]
        click.echo(f"{r['id']:16s}  {sp['backbone']:22s} {sp['layer']:12s} {sp['dim']:5d} {sp['dtype']:8s} "
                   f"{r['rows']:8d} {r['segments']:5d} {r['bytes'] / 2**20:8.1f}")


@cache.command("ls")
@click.argument("space")
@_cache_option
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: the space description and its keys (plain output: description, then keys).")
def cache_ls(space, cache_dir, limit, as_json):
    """Show one feature space's description and its first keys."""
    import json

    from .cache import FeatureCache

    fc = FeatureCache(cache_dir)
    store = fc.open_path(fc.find(space))
    keys = store.keys()[:limit]
    if as_json:
        click.echo(json.dumps({"id": store.space.id, "space": store.space.to_dict(), "rows": len(store),
                               "keys": keys}, indent=2))
    else:
        click.echo(json.dumps(store.space.to_dict(), indent=2, sort_keys=True))
        for k in keys:
            click.echo(k)
    store.close()


@cache.command("verify")
@_cache_option
@click.option("--repair", is_flag=True,
              help="Move damaged segments to <space>/quarantine/ so the next extraction refills their rows.")
def cache_verify(cache_dir, repair):
    """Check every segment of every space (checksums, attributes, shapes, values); exit 1 on any problem.

    Extraction and reads check each segment they use in the same way and never serve a damaged row; verify
    checks everything at once. With --repair it takes each space's lock exclusively (waiting for running
    extractions) and quarantines what failed.
    """
    from .cache import FeatureCache

    bad = 0
    for s in FeatureCache(cache_dir).stores(scan=False):
        r = s.verify(repair=repair)
        status = "ok" if r.ok else ("REPAIRED" if repair and r.quarantined else "FAILED")
        click.echo(f"{r.space_id}: {status} ({r.files} segments, {r.unique_rows} rows)")
        for p in r.problems:
            click.echo(f"  problem: {p}")
        for q in r.quarantined:
            click.echo(f"  quarantined: {q} (its rows are extracted again by the next run)")
        for n in r.notes:
            click.echo(f"  note: {n}")
        if not r.ok and not repair:
            click.echo("  fix: `probe cache verify --repair` moves damaged segments aside")
        bad += not r.ok and not (repair and len(r.quarantined) == len(r.damaged) == len(r.problems))
        s.close()
    if bad:
        raise click.ClickException(f"{bad} feature spaces failed verification")


_NO_WAIT = click.option("--no-wait", is_flag=True,
                        help="Fail at once if another probe process is using the space (default: wait for it).")


@cache.command("compact")
@_cache_option
@_NO_WAIT
def cache_compact(cache_dir, no_wait):
    """Merge each space's verified segments into one and remove leftovers of interrupted runs.

    Takes each space's lock exclusively: waits for running extractions and reads (or fails with --no-wait).
    Damaged segments are never merged.
    """
    from .cache import FeatureCache

    for s in FeatureCache(cache_dir).stores():
        before, after = s.compact(wait=not no_wait)
        click.echo(f"{s.space.id}: {before} segments -> {after}")
        s.close()


@cache.command("rm")
@click.argument("space")
@_cache_option
@_NO_WAIT
def cache_rm(space, cache_dir, no_wait):
    """Delete one feature space (SPACE: its id or a unique prefix, as `probe cache info` lists)."""
    from .cache import FeatureCache

    removed = FeatureCache(cache_dir).remove(space, wait=not no_wait)
    click.echo(f"removed {removed.name}")


def main():  # pragma: no cover - console entry point
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
