"""Context for the demo: multinomial logistic regression on raw pixels of the same train/test files."""

import sys
import time

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score

from probe.sources import resolve


def load(folder):
    records = resolve(folder)
    X = np.stack([np.asarray(Image.open(r.path).convert("L"), dtype=np.float32).ravel() / 255.0 for r in records])
    return X, np.array([r.label for r in records])


if __name__ == "__main__":
    X_tr, y_tr = load(sys.argv[1])
    X_te, y_te = load(sys.argv[2])
    t = time.perf_counter()
    clf = LogisticRegression(C=0.1, max_iter=1000).fit(X_tr, y_tr)
    acc = accuracy_score(y_te, clf.predict(X_te))
    print(f"pixel logistic regression (C=0.1): test accuracy {acc:.4f} "
          f"({len(y_tr)} train, {len(y_te)} test, fit {time.perf_counter() - t:.1f}s)")
