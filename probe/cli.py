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
        click.option("--threads", type=click.IntRange(min=0), default=None,
                     help="Decode threads running ahead of the model (default: 1 on small CPUs; 0: decode in the "
                          "model's thread)."),
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
                     help="JPEG decoding: reduced = libjpeg's DCT scaling, 2.5-6x faster on photos, within a stated "
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
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process; ray: a Ray cluster (pip install 'probe[ray]'), writing the same cache.")
@click.option("--address", default=None,
              help="--engine ray: the cluster (auto, ray://HOST:10001; default: start a local one).")
@click.option("--num-gpus-per-worker", type=click.FloatRange(min=0), default=0, show_default=True,
              help="--engine ray: GPUs per backbone actor (0: CPU actors).")
@click.option("--actors", type=click.IntRange(min=1), default=None,
              help="--engine ray: backbone actors (default: one per --num-gpus-per-worker GPUs, or per 4 CPUs).")
def extract(inputs, strict, report_path, engine, address, num_gpus_per_worker, actors, **o):
    """Extract features of INPUTS (folders, CSV/TSV files, image files) into the cache."""
    from .engine import extract as run_extract
    from .featureset import RUN_REPORT_FILE, write_run_report

    opts = extract_options(o)
    ray_only = {"--address": address is not None, "--num-gpus-per-worker": bool(num_gpus_per_worker),
                "--actors": actors is not None}
    if engine == "local":
        given = [name for name, v in ray_only.items() if v]
        if given:
            raise click.UsageError(f"{', '.join(given)} apply only to --engine ray")
        fs = run_extract(list(inputs), opts)
    else:
        from .distributed import extract_ray

        fs = extract_ray(list(inputs), opts, address=address, num_gpus_per_worker=num_gpus_per_worker,
                         actors=actors)
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
    f = _registry_option(f)
    return f


def _registry_option(f):
    return click.option("--registry", "registry", type=click.Path(file_okay=False), default=None,
                        help="Model registry folder for NAME[@REF] models (default: $PROBE_REGISTRY or models/).")(f)


def _load_model(ref_or_path, o):
    """MODEL is a .probe path or a registry reference NAME, NAME@champion, NAME@3."""
    from .registry import load_model

    return load_model(ref_or_path, registry=o.pop("registry", None), trust=o.pop("trust"),
                      check_versions=not o.pop("ignore_versions"))


def _compute_kwargs(o: dict) -> dict:
    """Speed options (:func:`compute_options`) for a model's extractor, checked by ExtractOptions."""
    return _compute_of(extract_options(o))


#: ExtractOptions fields that change speed, not features: a model's extractor takes these from the command line
#: (the model itself fixes backbone, weights, layer, pooling, dtype and decode).
COMPUTE_FIELDS = ("device", "amp", "batch_size", "workers", "threads", "max_pixels", "progress", "runtime")


def _compute_of(opts) -> dict:
    return {name: getattr(opts, name) for name in COMPUTE_FIELDS}


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
@click.option("--register", "register_as", default=None, metavar="NAME",
              help="Also add the model to the registry as the next version of NAME (the first becomes champion).")
@_registry_option
@backbone_options
@engine_options
def fit(data, clf, params, output, val, val_split, C, alpha, standardize, l2_normalize, no_extract, strict, seed,
        register_as, registry, **o):
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
    if register_as:
        from .registry import Registry

        mv = Registry(registry).register(res.path, register_as)
        click.echo(f"registered {mv.ref}" + (" (champion)" if mv.is_champion else ""))


@cli.command()
@click.argument("model")
@click.argument("data", nargs=-1, required=True, type=click.Path())
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help=f"Read cached features here and store new ones (default: read {DEFAULT_CACHE}/, write nothing).")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), default=None,
              help="Write metrics.json and confusion_matrix.png here.")
@click.option("--strict", is_flag=True, help="Fail on bad inputs and on overlap with the training data.")
@compute_options
@_model_options
def evaluate(model, data, cache, output_dir, strict, **o):
    """Report accuracy, balanced accuracy, macro-F1, top-5, ECE and per-class scores of MODEL on DATA.

    MODEL is a .probe file or a registry reference (NAME, NAME@champion, NAME@3)."""
    from .training import evaluate as run_evaluate

    m = _load_model(model, o)
    res = run_evaluate(m, list(data), cache=cache or DEFAULT_CACHE, write=cache is not None,
                       strict=strict, output_dir=output_dir, **_compute_kwargs(o))
    click.echo(res.report)
    if res.leakage:
        click.echo(f"leakage: {len(res.leakage)} inputs were in the training data (e.g. {res.leakage[0].other_path})")


@cli.command()
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Write here (atomically) instead of stdout; with --engine ray a folder (required).")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help=f"Read cached features here and store new ones (default: read {DEFAULT_CACHE}/, write nothing; "
                   f"--engine ray writes to {DEFAULT_CACHE}/).")
@click.option("--evaluate", "show_eval", is_flag=True, help="Inputs carry labels: print the evaluation to stderr.")
@click.option("--strict", is_flag=True, help="Exit non-zero when any input failed (rows are still written).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: extract on a Ray cluster and write one predictions file per block + manifest.json into "
                   "-o DIR; a rerun writes only the missing blocks.")
@click.option("--address", default=None, help="--engine ray: the cluster (auto, ray://HOST:10001).")
@click.option("--num-gpus-per-worker", type=click.FloatRange(min=0), default=0, show_default=True,
              help="--engine ray: GPUs per backbone actor.")
@click.option("--actors", type=click.IntRange(min=1), default=None, help="--engine ray: backbone actors.")
@click.option("--block-rows", type=click.IntRange(min=1), default=None,
              help="--engine ray: inputs per predictions file (default 10000).")
@compute_options
@_model_options
def predict(model, inputs, fmt, top_k, output, cache, show_eval, strict, engine, address, num_gpus_per_worker,
            actors, block_rows, **o):
    """Predict classes of INPUTS (files, folders, CSVs; `-` reads paths from stdin) with MODEL (a .probe file or
    a registry reference NAME[@REF])."""
    from .files import check_output_target
    from .prediction import predict as run_predict
    from .prediction import save_predictions, write_predictions
    from .sources import Record, resolve
    from .training import evaluate_features

    ray_only = {"--address": address is not None, "--num-gpus-per-worker": bool(num_gpus_per_worker),
                "--actors": actors is not None, "--block-rows": block_rows is not None}
    if engine == "ray":
        if not output:
            raise click.UsageError("--engine ray writes predictions into a folder: give -o DIR")
        if show_eval:
            raise click.UsageError("--evaluate is not available with --engine ray (use `probe evaluate`)")
    elif any(ray_only.values()):
        raise click.UsageError(f"{', '.join(n for n, v in ray_only.items() if v)} apply only to --engine ray")
    elif output:
        if Path(output).is_dir():  # -o names a file here (a folder only with --engine ray)
            raise click.BadParameter(f"File {output!r} is a directory.", param_hint="'-o' / '--output'")
        check_output_target(output)  # refuse a symlink / device target before any work
    m = _load_model(model, o)
    records = []
    for item in inputs:
        if item == "-":  # one path per line, each taken as a file: a bad line becomes an error row
            records.extend(Record(line.rstrip("\r\n")) for line in sys.stdin if line.strip())
        else:
            records.extend(resolve(item))
    if engine == "ray":
        res = _predict_ray(m, records, output, cache, fmt, top_k, block_rows, address, num_gpus_per_worker,
                           actors, o)
        if strict and res.failed:
            raise click.ClickException(f"--strict: {res.failed} of {len(records)} inputs failed")
        return
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


def _predict_ray(model, records, output, cache, fmt, top_k, block_rows, address, num_gpus, actors, o):
    from .batch_scoring import DEFAULT_BLOCK_ROWS, predict_ray

    kwargs = {k: v for k, v in _compute_kwargs(o).items() if k not in ("device", "workers") or v is not None}
    res = predict_ray(model, records, output, cache=cache or DEFAULT_CACHE, fmt=fmt, top_k=top_k,
                      block_rows=block_rows or DEFAULT_BLOCK_ROWS, address=address, num_gpus_per_worker=num_gpus,
                      actors=actors, **kwargs)
    if res.features is not None:
        for f in res.features.failures:
            click.echo(f"failed: {f.error}", err=True)
    click.echo(f"{len(res.blocks)} blocks: {res.written} written, {res.skipped} already there; "
               f"{res.failed} inputs failed; manifest {res.manifest}")
    return res


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


# -- model lifecycle: registry, drift, refit -----------------------------------------------------------------


@cli.group(cls=ProbeGroup)
def models():
    """The model registry: versions, the champion, promote / rollback / retire."""


def _version_line(mv) -> str:
    acc = mv.metrics.get("accuracy")
    gate = mv.gate or {}
    return (f"{mv.ref:24s} {'*' if mv.is_champion else ' '} {mv.status:9s} {mv.created:21s} "
            f"{(mv.head.get('name') or '?'):10s} "
            f"{'' if acc is None else f'acc {acc:.4f}':11s} "
            f"{'' if mv.parent is None else f'parent {mv.parent}':10s} {gate.get('decision', '')}")


@models.command("list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_registry_option
def models_list(name, as_json, registry):
    """List registered versions (of NAME, or all); * marks the champion."""
    import json

    from .registry import Registry

    reg = Registry(registry)
    versions = reg.versions(name)
    if as_json:
        click.echo(json.dumps([v.to_dict() for v in versions], indent=2))
        return
    if not versions:
        click.echo(f"{reg.root}: no models registered")
        return
    for v in versions:
        click.echo(_version_line(v))


@models.command("show")
@click.argument("ref")
@_registry_option
def models_show(ref, registry):
    """Everything recorded about NAME@REF (NAME = the champion): lineage, data, head, metrics, gate."""
    import json

    from .registry import Registry

    mv = Registry(registry).resolve(ref)
    click.echo(json.dumps(mv.to_dict(), indent=2, default=str))


@models.command("promote")
@click.argument("name")
@click.argument("version", type=int)
@_registry_option
def models_promote(name, version, registry):
    """Make NAME@VERSION the champion."""
    from .registry import Registry

    mv = Registry(registry).promote(name, version)
    click.echo(f"{mv.ref} is now the champion of {name}")


@models.command("rollback")
@click.argument("name")
@_registry_option
def models_rollback(name, registry):
    """Restore NAME's previous champion."""
    from .registry import Registry

    mv = Registry(registry).rollback(name)
    click.echo(f"rolled back: {mv.ref} is the champion of {name}")


@models.command("retire")
@click.argument("name")
@click.argument("version", type=int)
@_registry_option
def models_retire(name, version, registry):
    """Retire NAME@VERSION: it can no longer be promoted or served."""
    from .registry import Registry

    mv = Registry(registry).retire(name, version)
    click.echo(f"{mv.ref} retired")


@models.command("diff")
@click.argument("a")
@click.argument("b")
@_registry_option
def models_diff(a, b, registry):
    """Two versions side by side: metrics, head, data, lineage (rows that differ are marked)."""
    from .registry import Registry

    reg = Registry(registry)
    va, vb = reg.resolve(a), reg.resolve(b)
    rows = _flatten(va.to_dict())
    rows_b = _flatten(vb.to_dict())
    keys = [k for k in rows if k not in ("path",)] + [k for k in rows_b if k not in rows]
    width = max(len(k) for k in keys)
    click.echo(f"{'':{width}s}   {va.ref:30s} {vb.ref}")
    for k in keys:
        x, y = rows.get(k, ""), rows_b.get(k, "")
        click.echo(f"{k:{width}s} {'*' if x != y else ' '} {str(x)[:30]:30s} {str(y)[:60]}")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        elif isinstance(v, float):
            out[key] = f"{v:.4f}"
        else:
            out[key] = v
    return out


def _drift_options(f):
    return _apply(f, [
        click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05,
                     show_default=True, help="Significance level of the verdict (split over the tests)."),
        click.option("--seed", type=int, default=0, show_default=True),
    ])


@cli.command()
@click.argument("data", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model_ref", default=None,
              help="Compare DATA (= CURRENT) with this model's training inputs (features from the cache); adds "
                   "the predicted-label and confidence tests. A .probe path or NAME[@REF].")
@click.option("--permutations", type=click.IntRange(min=10), default=200, show_default=True,
              help="Permutations of the MMD test.")
@click.option("--max-samples", type=click.IntRange(min=10), default=1000, show_default=True,
              help="Subsample each side to at most this many inputs (seeded).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_drift_options
@_model_options
@backbone_options
@engine_options
@click.pass_context
def drift(ctx, data, model_ref, permutations, max_samples, as_json, alpha, seed, **o):
    """Test whether CURRENT data drifted from REFERENCE: `probe drift REFERENCE CURRENT` or
    `probe drift --model NAME CURRENT` (CURRENT `served`: the traffic `probe serve --capture` stored).
    Exit status 0 = no drift, 3 = drift, 1 = error."""
    import json

    from . import drift as dr

    kw = dict(alpha=alpha, seed=seed, n_permutations=permutations, max_samples=max_samples)
    opts = extract_options(o)
    if model_ref:
        if len(data) != 1:
            raise click.UsageError("with --model give one CURRENT data source")
        m = _load_model(model_ref, o)
        current = None
        if data[0] == "served":  # the traffic `probe serve --capture` stored: features straight from the cache
            from .capture import served_features, served_model_name

            current = served_features(opts.cache, m, served_model_name(model_ref, m))
        report = dr.check_model(m, data[0], cache=opts.cache, current_features=current, **kw, **_compute_of(opts))
    else:
        if len(data) != 2:
            raise click.UsageError("give REFERENCE and CURRENT (or --model NAME CURRENT)")
        report = dr.check_sources(data[0], data[1], backbone=opts, cache=opts.cache, **kw)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    ctx.exit(3 if report.drift else 0)


@cli.command()
@click.argument("name")
@click.argument("new_data", nargs=-1, required=True, type=click.Path())
@click.option("--if-drift", is_flag=True, help="Run the drift check first; stop (exit 4) when there is none.")
@click.option("--policy", default="all", show_default=True,
              help="Training data: all (champion's training set + new), new (new only), window:N (newest N).")
@click.option("--gate", type=click.Path(), default=None, help="Labelled gate data (never trained on).")
@click.option("--gate-split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Without --gate: this seeded fraction of NEW_DATA is the gate set.")
@click.option("--metric", type=click.Choice(["accuracy", "balanced_accuracy", "macro_f1"]), default="accuracy",
              show_default=True)
@click.option("--tolerance", type=click.FloatRange(min=0), default=0.005, show_default=True,
              help="Promote when the challenger is at most this much worse than the champion.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_drift_options
@_model_options
@compute_options
@click.option("--cache", type=click.Path(file_okay=False), default=DEFAULT_CACHE, show_default=True,
              help="Feature cache (holding the champion's training features; new features are added).")
@click.pass_context
def refit(ctx, name, new_data, if_drift, policy, gate, gate_split, metric, tolerance, as_json, alpha, seed, **o):
    """Refit NAME's head on NEW_DATA (+ cached old data), gate it against the champion, promote if not worse.
    Exit status 0 = promoted, 3 = rejected by the gate, 4 = no drift (--if-drift), 1 = error."""
    import json

    from .refit import refit as run_refit

    registry, trust, check_versions = o.pop("registry"), o.pop("trust"), not o.pop("ignore_versions")
    opts = extract_options(o)
    res = run_refit(name, list(new_data) if len(new_data) > 1 else new_data[0], registry=registry,
                    cache=opts.cache, policy=policy, gate=gate, gate_split=gate_split, metric=metric,
                    tolerance=tolerance, if_drift=if_drift, alpha=alpha, seed=seed, trust=trust,
                    check_versions=check_versions, **_compute_of(opts))
    if as_json:
        click.echo(json.dumps({
            "decision": res.decision, "champion": res.champion.ref,
            "challenger": res.challenger.ref if res.challenger else None, "metric": res.metric,
            "champion_score": res.champion_score, "challenger_score": res.challenger_score,
            "tolerance": res.tolerance, "gate_digest": res.gate_digest, "n_gate": len(res.gate_keys),
            "policy": res.policy, "n_train": res.n_train, "n_old": res.n_old, "n_new": res.n_new,
            "drift": res.drift.to_dict() if res.drift else None,
            "seconds": {k: round(v, 3) for k, v in res.seconds.items()}}, indent=2))
    else:
        if res.drift is not None:
            click.echo(res.drift.format())
        click.echo(res.format())
    ctx.exit(res.exit_code)


# -- serving -------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; anything but loopback needs --token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most inputs gathered into one batch (1 turns dynamic batching off); the backbone runs a batch "
                   "in passes of its device batch size (8 on CPU, 128 on CUDA).")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long a forming batch waits for requests already arriving (a lone request never waits).")
@click.option("--capture", is_flag=True,
              help="Store features of served inputs in the cache and log their keys (for `probe drift`).")
@click.option("--token", envvar="PROBE_TOKEN", default=None,
              help="Bearer token required on every endpoint but /health (env PROBE_TOKEN).")
@click.option("--registry", "registry_dir", type=click.Path(file_okay=False), default=None,
              help="Model registry folder, when MODEL is a reference (NAME, NAME@champion, NAME@3).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=DEFAULT_CACHE, show_default=True,
              help="Feature cache: read for known inputs; written only with --capture.")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=20.0, show_default=True,
              help="Largest request body.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds before a prediction request gets 504.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--runtime", type=click.Choice(["auto", "eager", "onnxruntime", "openvino"]), default="auto",
              show_default=True, help="What runs the backbone (auto: the choice this machine remembers, else eager).")
@click.option("--trust", is_flag=True, help="Allow loading a head stored as a pickle (runs code!).")
def serve(model, host, port, max_batch, max_wait_ms, capture, token, registry_dir, cache_dir, max_body_mb, timeout_s,
          device, runtime, trust):
    """Serve MODEL (a .probe file or a registry reference) over HTTP: /predict, /metadata, /health and a page at /."""
    from .serve import check_bind, create_app

    check_bind(host, token)
    try:
        import uvicorn
    except ImportError:
        raise click.ClickException("probe serve needs the [serve] extra: pip install 'probe[serve]'") from None
    app = create_app(model, registry=registry_dir, cache=cache_dir, capture=capture, max_batch=max_batch,
                     max_wait_ms=max_wait_ms, token=token, max_body_bytes=int(max_body_mb * 2**20),
                     timeout_s=timeout_s, trust=trust,
                     extract_options={"runtime": runtime, **({"device": device} if device else {})})
    served = app.state.predictor.current
    version = "" if served.version is None else f" version {served.version}"
    click.echo(f"serving {served.name}{version} on http://{host}:{port}/ (Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=5)


def main():  # pragma: no cover - console entry point
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
