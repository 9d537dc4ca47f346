"""Benchmark 4: incremental extraction.

A folder of N files is extracted into a cold cache; then 10 % new files are added to the folder and the folder is
extracted again (only the new files reach the model; the others are answered by the hash memo and the cache).
That incremental run is compared with a cold extraction of the whole grown folder into a fresh cache, measured in
the same run. Wall time of the ``probe.extract`` call (backbone preloaded, auto-tuned batch size pinned).
Target: incremental <= 15 % of cold.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import harness as h
import workload as wl

NAME = "incremental"
TITLE = "4. Incremental extraction (+10 % files)"
TARGET = 0.15


def run(cfg: h.Config) -> None:
    ref = cfg.speed_backbone
    bb, _ = wl.backbone(ref)
    bs, _ = wl.tuned_batch_size(cfg, ref)
    n = cfg.sizes.incremental
    added = max(1, n // 10)
    files = wl.pool_files(cfg, n + added)
    folder = wl.fresh_dir(cfg.work / "incremental" / "folder")
    base = cfg.work / "incremental" / "cache"
    fresh = cfg.work / "incremental" / "cache-cold"

    def copy(paths):
        for p in paths:
            shutil.copy2(p, folder / Path(p).name)

    copy(files[:n])
    rows = []
    fs, wall = wl.extract(cfg, folder, bb, base, fresh=True, batch_size=bs)
    rows.append({"phase": f"first extraction ({n} files, cold)", "files": n, "wall_s": wall,
                 **h.stats_columns(fs.stats)})
    copy(files[n:])
    fs, inc = wl.extract(cfg, folder, bb, base, batch_size=bs)
    rows.append({"phase": f"incremental (+{added} new files)", "files": n + added, "wall_s": inc,
                 **h.stats_columns(fs.stats)})
    fs, cold = wl.extract(cfg, folder, bb, fresh, fresh=True, batch_size=bs)
    rows.append({"phase": f"cold ({n + added} files, fresh cache)", "files": n + added, "wall_s": cold,
                 **h.stats_columns(fs.stats)})
    rows.append({"phase": "ratio incremental / cold", "files": n + added, "ratio": inc / cold,
                 "ideal": added / (n + added), "target": TARGET, "met": inc / cold <= TARGET})
    for r in rows:
        r["backbone"] = str(ref)
    h.write_rows(cfg, NAME, rows)


def section(results: dict) -> tuple[str, list[dict]]:
    rows = results.get(NAME) or []
    runs = [r for r in rows if not r["phase"].startswith("ratio")]
    ratio = next((r for r in rows if r["phase"].startswith("ratio")), None)
    table = [{"run": r["phase"], "wall s": h.fmt(r["wall_s"]), "new": r["new"], "cached": r["cached"],
              "files hashed": r["files_hashed"], "hash s": h.fmt(r["hash_s"]), "data wait s": h.fmt(r["data_wait_s"]),
              "model s": h.fmt(r["model_s"]), "write s": h.fmt(r["write_s"])} for r in runs]
    text = [f"Backbone {rows[0]['backbone'] if rows else '?'} (speed only), batch size pinned to the auto-tuned "
            "value; wall time of the `probe.extract` call with the backbone already loaded.", "",
            h.md_table(table, list(table[0]) if table else [])]
    claims = []
    if ratio:
        text += ["", f"**Incremental / cold = {h.fmt(100 * h.num(ratio['ratio']), 3)} %** (the new files alone are "
                     f"{h.fmt(100 * h.num(ratio['ideal']), 3)} % of the inputs; target <= {100 * TARGET:.0f} %)."]
        claims.append(h.claim("4 incremental", "incremental run / cold run (wall)",
                              f"{h.fmt(100 * h.num(ratio['ratio']), 3)} %", f"<= {100 * TARGET:.0f} %",
                              ratio["met"] == "yes"))
    return "\n".join(text), claims


def main(argv=None):
    run(h.parse_config(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
