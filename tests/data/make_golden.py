"""Writes the golden fixtures under tests/data/ (run once per format version; the files are committed).

    python tests/data/make_golden.py

golden-v1/images/   6 PNG files (3 classes), the inputs
golden-v1/cache/    a feature cache written by format version 1 (test:tiny-cnn, 2 segments of 3 rows)
golden-v1/model.probe  a logreg model (format_version 1) trained on those features

tests/test_golden.py pins their digests, keys and values as literals: a change to the feature-space identity
recipe, the segment layout or the model format fails those tests instead of silently orphaning users' caches.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    from conftest import CLASS_COLORS, make_image

    import probe

    out = HERE / "golden-v1"
    shutil.rmtree(out, ignore_errors=True)
    for c, (name, color) in enumerate(sorted(CLASS_COLORS.items())):
        for i in range(2):
            make_image(out / "images" / name / f"{name}_{i}.png", seed=100 * c + i, size=(24, 24), color=color)
    opts = dict(backbone="test:tiny-cnn", device="cpu", workers=0, batch_size=3, progress=False, segment_rows=3)
    probe.extract(out / "images", cache=out / "cache", **opts)
    res = probe.fit(out / "images", "logreg", cache=out / "cache", value=1.0, val_split=0,
                    **{k: v for k, v in opts.items() if k != "segment_rows"})
    res.model.meta_["training"]["source"] = ["images"]
    res.model.backbone_["weights_path"] = None
    res.model.save(out / "model.probe")
    for p in [*(out / "cache").glob("hashes.sqlite*"), *(out / "cache").rglob(".lock")]:
        p.unlink()  # caches of this machine's paths and locks: not part of the fixture
    print("written", sorted(str(p.relative_to(HERE)) for p in out.rglob("*") if p.is_file()))


if __name__ == "__main__":
    main()
