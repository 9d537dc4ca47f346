"""Batch scoring on Ray (``probe predict MODEL INPUTS --engine ray -o DIR``): one predictions file per block of
inputs plus a manifest, resumable by rerunning.

    inputs --resolve--> records --split in input order--> blocks of ``block_rows``
    blocks whose file exists in DIR (same model, format, top-k and inputs) --> skipped
    the other blocks' records --RayExtractor (cluster; into the cache)--> FeatureSet
    per block: the head on its cached features (driver) --> DIR/predictions-<block>-<digest>.<csv|jsonl>, atomic
    DIR/manifest.json (atomic): every block's file, first input index, rows and failures

A block's file name carries a digest of the model, the output format, top-k and the block's input paths, so a rerun
after a kill writes only the missing blocks (and extracts only rows not yet cached), while a different model or
different inputs never reuse a file. The backbone runs on the cluster; the head (microseconds per row) runs on
the driver, reading each block's features from the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from .defaults import DEFAULT_CACHE
from .featureset import Failure, FeatureSet
from .files import atomic_write_text
from .model import ProbeModel
from .options import OptionError
from .prediction import predictions_from_features, save_predictions
from .sources import Record, resolve

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "probe.batch-predictions"
DEFAULT_BLOCK_ROWS = 10_000


@dataclass
class Block:
    file: str
    first_index: int  # position of the block's first input in the run's inputs
    inputs: int
    failed: int | None = None  # None: written by an earlier run that left no count
    written: bool = False  # by this run (False: already there)


@dataclass
class BatchScoring:
    out_dir: Path
    blocks: list[Block] = field(default_factory=list)
    features: FeatureSet | None = None  # of the blocks written by this run (None when all were there)

    @property
    def written(self) -> int:
        return sum(b.written for b in self.blocks)

    @property
    def skipped(self) -> int:
        return len(self.blocks) - self.written

    @property
    def failed(self) -> int:
        return sum(b.failed or 0 for b in self.blocks)

    @property
    def manifest(self) -> Path:
        return self.out_dir / MANIFEST


def model_digest(model: ProbeModel) -> str:
    """Identity of a model's predictions: its backbone record and its fitted head."""
    import joblib

    return joblib.hash((model.backbone_, model.head_))


def predict_ray(model: ProbeModel, inputs: Sequence[Record | str | os.PathLike] | str | os.PathLike,
                out_dir: str | os.PathLike, *, cache=DEFAULT_CACHE, fmt: str = "csv", top_k: int = 5,
                block_rows: int = DEFAULT_BLOCK_ROWS, address: str | None = None, actors: int | None = None,
                num_gpus_per_worker: float = 0, max_retries: int = 2, **extract_options) -> BatchScoring:
    """Score ``inputs`` with ``model`` into ``out_dir`` (see the module docstring); features are extracted on
    Ray into ``cache``. ``extract_options`` are speed options (amp, batch_size, max_pixels, segment_rows, ...)."""
    from .distributed import RayExtractor

    if fmt not in ("csv", "jsonl"):
        raise OptionError(f"fmt={fmt!r} is not one of csv, jsonl")
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise OptionError(f"block_rows={block_rows!r} must be an integer >= 1")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out}: not a folder (--engine ray writes one predictions file per block into a folder)")
    records = inputs if isinstance(inputs, list) and all(isinstance(r, Record) for r in inputs) else resolve(inputs)
    ident = hashlib.sha256(f"{model_digest(model)}|{fmt}|{top_k}".encode())
    result = BatchScoring(out)
    previous = _read_manifest(out)
    pending: list[tuple[Block, list[Record]]] = []
    for b, start in enumerate(range(0, len(records), block_rows)):
        chunk = records[start:start + block_rows]
        h = ident.copy()
        for r in chunk:
            h.update(b"\0" + str(r.path).encode())
        block = Block(f"predictions-{b:06d}-{h.hexdigest()[:16]}.{fmt}", start, len(chunk))
        if (out / block.file).is_file():
            block.failed = previous.get(block.file, {}).get("failed")
        else:
            pending.append((block, chunk))
        result.blocks.append(block)
    if pending:
        todo = [r for _, chunk in pending for r in chunk]
        opts = model.extract_options(cache, write=True, **extract_options)
        ex = RayExtractor(opts, address=address, actors=actors, num_gpus_per_worker=num_gpus_per_worker,
                          max_retries=max_retries, check_space=model.check_backbone)
        fs = result.features = ex.extract(todo)
        offset = 0
        for block, chunk in pending:
            sub = _slice(fs, offset, offset + len(chunk))
            scored = predictions_from_features(model, chunk, sub, top_k)
            save_predictions(scored, out / block.file, fmt)
            block.failed, block.written = len(sub.failures), True
            offset += len(chunk)
        log.info("batch scoring: %d blocks written, %d already there", result.written, result.skipped)
    body = {
        "format": MANIFEST_FORMAT, "version": 1, "model": model_digest(model), "backbone": model.backbone_["name"],
        "predictions_format": fmt, "top_k": top_k, "inputs": len(records), "block_rows": block_rows,
        "blocks": [{k: v for k, v in asdict(b).items() if k != "written"} for b in result.blocks],
    }
    atomic_write_text(out / MANIFEST, json.dumps(body, indent=2) + "\n")
    return result


def _slice(fs: FeatureSet, lo: int, hi: int) -> FeatureSet:
    """The rows and failures of inputs ``lo .. hi-1``, re-indexed from 0 (features still read from the cache)."""
    js = [j for j, i in enumerate(fs.indices) if lo <= i < hi]
    return FeatureSet(
        keys=[fs.keys[j] for j in js], paths=[fs.paths[j] for j in js], labels=[fs.labels[j] for j in js],
        indices=[fs.indices[j] - lo for j in js],
        failures=[Failure(f.index - lo, f.path, f.error) for f in fs.failures if lo <= f.index < hi],
        stats=fs.stats, space=fs.space, store=fs.store,
    )


def _read_manifest(out: Path) -> dict[str, dict]:
    try:
        body = json.loads((out / MANIFEST).read_text())
        return {b["file"]: b for b in body.get("blocks", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
