"""Distributed extraction on Ray Data, writing the same cache a local run writes (``probe extract --engine ray``).

    driver  records --hash (memo; cluster tasks for large runs)--> keys --cache lookup--> misses (first per key)
    Ray     (index, path, key) rows --decode + resize/crop (tasks)--> uint8 crops, or an error per row
            --backbone (actor pool: one model load per actor, a GPU each when asked)--> features, or an error
            --CacheSink (one segment per write task, named by its keys)--> <space>/segments/seg-<t>-ray-<d>.h5
    driver  refresh the store --> FeatureSet + ExtractStats, failures reported as by the local engine

The feature space is computed on the driver from the same options as :class:`probe.engine.Extractor` and each
actor checks that its loaded backbone lands in exactly that space (same weights digest, preprocess, precision),
so a Ray run and a local run of the same options share rows.

Failure behaviour: tasks, actor restarts and actor task retries are bounded (``max_retries``; Ray's defaults
retry forever). A bad input is a row with an error, never a task error. Segment names are derived from the sorted
keys they hold and a sink task skips a name that already exists, so a retried write cannot add a duplicate; a
killed job leaves only complete segments, and rerunning it extracts the remaining misses only.

What runs on the workers (hashing, decoding, the backbone actor, the cache datasink) is in
:mod:`probe.ray_workers`. Ray is an optional extra (``pip install 'probe[ray]'``): without it this module still
imports and says how to install it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

from .backbones import load_backbone
from .cache import FeatureCache, FeatureStore
from .defaults import DEFAULT_BACKBONE
from .engine import UNSET, make_options, resolve_precision
from .errors import ProbeError
from .featureset import ExtractStats, Failure, FeatureSet, assemble
from .options import ExtractOptions, OptionError
from .ray_workers import CRASH_ONCE_ENV, BackboneActor, CacheSink, decode_batch, gpu_precision, hash_batch
from .sources import MEMO_FILE, HashMemo, HashResult, Record, hash_files, resolve
from .space import FeatureSpace

log = logging.getLogger(__name__)

INSTALL_HINT = "--engine ray needs Ray Data: pip install 'probe[ray]'"
DEFAULT_MAX_RETRIES = 2
#: From this many inputs on, files are stat'ed and hashed by cluster tasks instead of on the driver.
DEFAULT_HASH_ON_CLUSTER = 20_000


def import_ray():
    """``ray`` with Ray Data, or a one-line ProbeError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ProbeError(INSTALL_HINT) from e
    return ray


@dataclass
class RayRun:
    """What the Ray job did, beyond :class:`ExtractStats`: the segments it published."""

    segments: list[str] = field(default_factory=list)
    skipped_segments: int = 0  # names that already existed (a retried write)
    actors: int = 0
    seconds_start: float = 0.0  # connecting to / starting the cluster
    seconds_job: float = 0.0  # the Ray Data pipeline, end to end


class RayExtractor:
    """Extract on a Ray cluster (``address``: None starts a local one; ``"auto"``, ``"ray://host:10001"``).

    Built from the same :class:`~probe.options.ExtractOptions` as :class:`probe.engine.Extractor` (or the same
    keywords), so both engines land in the same feature space; ``device`` and ``workers`` do not apply (actors get
    GPUs through ``num_gpus_per_worker``), and ``segment_rows`` caps the rows per block, hence per segment.
    ``actors`` backbone actors run in parallel (default: one per ``num_gpus_per_worker`` GPUs of the cluster, or
    one per 4 CPUs, at least 1); ``max_retries`` bounds every task retry and actor restart. From
    ``hash_on_cluster`` inputs on, cluster tasks stat and hash the files (the driver only reads and writes the hash
    memo). An already-initialized Ray (``ray.init`` by the caller) is used as it is and left running.
    """

    def __init__(self, backbone: str | ExtractOptions = DEFAULT_BACKBONE, cache=UNSET, *,
                 address: str | None = None, actors: int | None = None, num_gpus_per_worker: float = 0,
                 max_retries: int = DEFAULT_MAX_RETRIES, hash_on_cluster: int = DEFAULT_HASH_ON_CLUSTER,
                 check_space=None, **options):
        self.options = opts = make_options(backbone, cache, **options)
        if opts.device is not None or opts.workers is not None:
            raise OptionError("device and workers do not apply to the Ray engine (use num_gpus_per_worker, actors)")
        if opts.cache is None or not opts.write:
            raise OptionError("the Ray engine writes to a cache: give a cache folder and write=True")
        if num_gpus_per_worker < 0:
            raise OptionError(f"num_gpus_per_worker={num_gpus_per_worker} must be >= 0")
        if actors is not None and (isinstance(actors, bool) or not isinstance(actors, int) or actors < 1):
            raise OptionError(f"actors={actors!r} must be an integer >= 1")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise OptionError(f"max_retries={max_retries!r} must be an integer >= 0")
        import_ray()  # fail early, before loading anything, when the extra is missing
        self.cache = FeatureCache(opts.cache)
        self.address = address
        self.actors = actors
        self.num_gpus = num_gpus_per_worker
        self.max_retries = max_retries
        self.hash_on_cluster = hash_on_cluster
        self.check_space = check_space  # called with (backbone, space) before any work, e.g. a model's check
        # Loaded on the driver (CPU) for the feature space: weights digest, preprocess, dim.
        self.backbone = load_backbone(opts.backbone, opts.weights, opts.layer, opts.pooling).with_decode(opts.decode)
        self.run = RayRun()

    # -- public ------------------------------------------------------------------------------------------

    def extract(self, inputs: Sequence[Record | str | os.PathLike], strict: bool = False) -> FeatureSet:
        t_start = time.perf_counter()
        ray = import_ray()
        records = [r if isinstance(r, Record) else Record(str(r)) for r in inputs]
        if any(not isinstance(r.path, str) for r in records):
            raise ProbeError("--engine ray extracts files; pass in-memory images to the local engine")
        started = False
        try:
            device = "cuda" if self.num_gpus else "cpu"
            if self.num_gpus and self.options.amp in ("auto", True):
                started = self._connect(ray)  # bf16 or fp16 depends on the workers' GPUs: ask one
                precision = self._gpu_precision(ray)
            else:
                precision = resolve_precision(self.options.amp, _device(device))
            space = self.backbone.feature_space(dtype=self.options.dtype, precision=precision)
            if self.check_space is not None:
                self.check_space(self.backbone, space)
            store = self.cache.open(space)
            self.cache.check_writable(space)
            stats = ExtractStats(inputs=len(records), device=f"ray/{device}", precision=precision)
            if len(records) >= self.hash_on_cluster:
                started = self._connect(ray) or started
            keys, failures = self._keys(ray, records, stats)
            with store.lock():  # shared, as a local run holds it: compact/rm on this machine wait for the job
                store.refresh()
                ok_idx = [i for i, k in enumerate(keys) if k is not None]
                first: dict[str, int] = {}
                for i in ok_idx:
                    first.setdefault(keys[i], i)
                stats.unique = len(first)
                todo = [first[k] for k in store.missing(first)]  # verified: a damaged row counts as missing
                stats.cached = stats.unique - len(todo)
                bad: dict[int, str] = {}
                if todo:
                    started = self._connect(ray) or started
                    bad = self._run_job(ray, todo, records, keys, space, store, stats)
                    store.refresh()
                still_missing = set(store.missing(keys[i] for i in todo))
        finally:
            if started:
                ray.shutdown()
        failures.extend(Failure(i, records[i].path, err) for i, err in sorted(bad.items()))
        bad_keys = {keys[i] for i in bad}
        lost = [i for i in todo if keys[i] in still_missing and i not in bad]
        failures.extend(Failure(i, records[i].path, f"{records[i].path}: not extracted (the Ray job lost it; rerun)")
                        for i in lost)
        bad_keys.update(keys[i] for i in lost)
        stats.new = sum(1 for i in todo if keys[i] not in still_missing)
        return assemble(records, keys, failures, bad_keys, stats, space, store, t_start=t_start, strict=strict,
                        engine="extract (ray)")

    # -- steps -------------------------------------------------------------------------------------------

    def _connect(self, ray) -> bool:
        """Connect to (or start) the cluster; True when this call started it (and so must shut it down)."""
        if ray.is_initialized():
            return False
        t = time.perf_counter()
        try:
            ray.init(address=self.address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=log.isEnabledFor(logging.INFO))
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = self.address or "a local cluster"
            raise ProbeError(f"cannot connect to Ray at {where}: {str(e).splitlines()[0] if str(e) else e}") from e
        self.run.seconds_start = time.perf_counter() - t
        return True

    def _gpu_precision(self, ray) -> str:
        """bf16 or fp16, as the local engine would choose on one of the cluster's GPUs (asked by a GPU task)."""
        self._check_gpus(ray)
        remote = ray.remote(num_gpus=self.num_gpus, max_retries=self.max_retries)(gpu_precision)
        return ray.get(remote.remote(self.options.amp))

    def _check_gpus(self, ray) -> None:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if gpus < self.num_gpus:  # a GPU request the cluster cannot meet would wait forever
            raise ProbeError(f"num_gpus_per_worker={self.num_gpus:g}, but the Ray cluster has {gpus:g} GPUs")

    def _keys(self, ray, records: list[Record], stats: ExtractStats) -> tuple[list[str | None], list[Failure]]:
        """Content keys; from ``hash_on_cluster`` inputs on, the files are stat'ed and hashed by cluster tasks
        (the driver only looks up and stores the hash memo)."""
        t = time.perf_counter()
        paths = [r.path for r in records]
        memo = HashMemo.open(self.cache.root / MEMO_FILE)
        try:
            if len(paths) >= self.hash_on_cluster:
                res = self._hash_on_cluster(ray, paths, memo)
            else:
                res = hash_files(paths, memo)
        finally:
            if memo is not None:
                memo.close()
        failures = [Failure(i, records[i].path, err) for i, err in sorted(res.errors.items())]
        stats.files_hashed = res.read
        stats.seconds["hash"] = time.perf_counter() - t
        return res.keys, failures

    def _hash_on_cluster(self, ray, paths: list[str], memo: HashMemo | None) -> HashResult:
        import pyarrow as pa

        files = [os.path.abspath(p) for p in paths]
        known = memo.lookup(files) if memo is not None else {}
        rows = max(256, math.ceil(len(paths) / (8 * max(1.0, float(ray.cluster_resources().get("CPU", 1))))))
        blocks = []
        for s in range(0, len(paths), rows):
            part = files[s:s + rows]
            hits = [known.get(f) for f in part]
            blocks.append(pa.table({
                "index": list(range(s, s + len(part))), "path": paths[s:s + rows], "file": part,
                "known_size": [h[0] if h else -1 for h in hits], "known_mtime_ns": [h[1] if h else -1 for h in hits],
                "known_key": [h[2] if h else "" for h in hits],
            }))
        keys: list[str | None] = [None] * len(paths)
        errors: dict[int, str] = {}
        fresh, read = [], 0
        with warnings.catch_warnings():  # the retry limit can only be passed as a ray_remote_args (deprecated)
            warnings.simplefilter("ignore")
            ds = ray.data.from_arrow(blocks).map_batches(hash_batch, batch_size=None, batch_format="numpy",
                                                         num_cpus=0.5, max_retries=self.max_retries)
            try:
                for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    for j in range(len(b.get("index", ()))):
                        i = int(b["index"][j])
                        if b["error"][j]:
                            errors[i] = str(b["error"][j])
                        else:
                            keys[i] = str(b["key"][j])
                        if int(b["size"][j]) >= 0:  # hashed (not a memo hit): remember it
                            read += 1
                            fresh.append((files[i], int(b["size"][j]), int(b["mtime_ns"][j]), keys[i]))
            except Exception as e:
                raise ProbeError(f"hashing on the Ray cluster failed: {_first_line(e)}") from e
        if memo is not None and fresh:
            memo.store(fresh)
        return HashResult(keys, errors, read)

    def _shape(self, ray, n: int) -> tuple[int, int, float, float]:
        """(actors, rows per block, CPUs per actor, CPUs per decode task) for ``n`` inputs on this cluster."""
        cpus = float(ray.cluster_resources().get("CPU", 1))
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if self.num_gpus:
            self._check_gpus(ray)
        if self.actors is not None:
            actors = self.actors
        elif self.num_gpus:
            actors = max(1, int(gpus // self.num_gpus))
        else:
            actors = max(1, int(cpus // 4))
        # Fractional CPUs on a small machine: whole CPUs per actor would leave none for decoding (Ray deadlocks).
        small = cpus <= 2 * actors
        actor_cpus = 0.5 if small else 1.0
        task_cpus = 0.5 if small else 1.0
        batch = self.options.batch_size or (128 if self.num_gpus else 8)
        # A few blocks per actor for balance; a block is at least a batch and at most segment_rows rows (a block
        # becomes one segment, so a killed job loses at most the blocks in flight).
        rows = min(self.options.segment_rows, max(batch, math.ceil(n / (4 * actors))))
        return actors, rows, actor_cpus, task_cpus

    def _run_job(self, ray, todo: list[int], records: list[Record], keys: list, space: FeatureSpace,
                 store: FeatureStore, stats: ExtractStats) -> dict[int, str]:
        import pyarrow as pa

        actors, rows, actor_cpus, task_cpus = self._shape(ray, len(todo))
        batch = self.options.batch_size or (128 if self.num_gpus else 8)
        stats.batch_size, stats.workers = batch, actors
        self.run.actors = actors
        ctx = ray.data.DataContext.get_current()
        progress = self.options.progress
        ctx.enable_progress_bars = sys.stderr.isatty() if progress is None else progress  # as the local engine
        if not log.isEnabledFor(logging.INFO):  # Ray Data logs every execution plan at INFO on stderr
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        blocks = [
            pa.table({"index": todo[s:s + rows], "path": [records[i].path for i in todo[s:s + rows]],
                      # absolute: a worker on another node does not share the driver's working directory
                      "file": [os.path.abspath(records[i].path) for i in todo[s:s + rows]],
                      "key": [keys[i] for i in todo[s:s + rows]]})
            for s in range(0, len(todo), rows)
        ]
        o = self.options
        spec = {
            "backbone": o.backbone, "weights": o.weights, "layer": o.layer, "pooling": o.pooling,
            "dtype": space.dtype, "precision": space.precision, "digest": space.digest, "gpu": bool(self.num_gpus),
            "decode": o.decode, "runtime": o.runtime,
        }
        env = {CRASH_ONCE_ENV: os.environ[CRASH_ONCE_ENV]} if os.environ.get(CRASH_ONCE_ENV) else None
        sink = CacheSink(os.path.abspath(store.path), space.to_dict(), _meta())  # absolute, as the inputs
        retries = self.max_retries
        t = time.perf_counter()
        with warnings.catch_warnings():  # retry limits can only be passed as ray_remote_args (deprecated name)
            warnings.simplefilter("ignore")
            ds = ray.data.from_arrow(blocks)
            ds = ds.map_batches(
                decode_batch, batch_size=None, batch_format="numpy", num_cpus=task_cpus, max_retries=retries,
                fn_kwargs={"preprocess": self.backbone.preprocess, "max_pixels": o.max_pixels},
            )
            ds = ds.map_batches(
                BackboneActor, batch_size=batch, batch_format="numpy", fn_constructor_kwargs={"spec": spec},
                compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=actor_cpus,
                num_gpus=self.num_gpus or None, max_restarts=retries, max_task_retries=retries,
                runtime_env={"env_vars": env} if env else None,
            )
            try:
                ds.write_datasink(sink, ray_remote_args={"max_retries": retries})
            except Exception as e:  # Ray wraps worker errors in long multi-line exceptions
                raise ProbeError(f"the Ray job failed: {_first_line(e)}") from e
        self.run.seconds_job = stats.seconds["model"] = time.perf_counter() - t
        self.run.segments, self.run.skipped_segments = sink.segments, sink.skipped
        stats.model_batches = len(sink.batches)
        return sink.failures


def extract_ray(source, backbone: str | ExtractOptions = DEFAULT_BACKBONE, cache=UNSET, *, strict: bool = False,
                **options) -> FeatureSet:
    """:func:`probe.engine.extract` on Ray: a folder / CSV / file list into the cache, as a FeatureSet.

    ``options`` are those of :class:`RayExtractor`: the ExtractOptions fields (or an ExtractOptions as
    ``backbone``), plus address, actors, num_gpus_per_worker, max_retries. Options are checked before the inputs
    are listed."""
    extractor = RayExtractor(backbone, cache, **options)
    return extractor.extract(resolve(source), strict=strict)


def _first_line(e: BaseException) -> str:
    for cause in (e.__cause__, e):
        if cause is not None and isinstance(getattr(cause, "cause", None), ProbeError):
            return str(cause.cause)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    ours = [ln.split(": ", 1)[-1] for ln in lines if ln.startswith("probe.errors.")]  # a ProbeError in a worker
    return (ours or lines or [type(e).__name__])[-1][:500]


def _device(name: str):
    import torch

    return torch.device(name)


def _meta() -> dict:
    import torch

    from . import __version__

    return {"probe_version": __version__, "torch_version": torch.__version__, "writer": "ray"}
