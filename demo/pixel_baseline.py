"""Context for the demo: logistic regression on raw pixels of the same train/test files, with the same protocol
as `probe fit` (C swept on a 10% validation split, refit on train+val)."""

import sys

import numpy as np
from PIL import Image

from probe.sweep import fit_head
from probe.sources import resolve


def load(folder):
    records = resolve(folder)
    X = np.stack([np.asarray(Image.open(r.path).convert("L"), dtype=np.float32).ravel() / 255.0 for r in records])
    return X, np.array([r.label for r in records])


if __name__ == "__main__":
    X_tr, y_tr = load(sys.argv[1])
    X_te, y_te = load(sys.argv[2])
    hf = fit_head("logreg", X_tr, y_tr)
    acc = float((hf.estimator.predict(X_te) == y_te).mean())
    print(f"pixel logistic regression: test accuracy {acc:.4f} (C={hf.chosen['clf__C']:.3g}, "
          f"{len(y_tr)} train, {len(y_te)} test, {hf.fit_seconds:.1f}s)")
