#!/usr/bin/env bash
# The demo: real Fashion-MNIST files, real EfficientNet-Lite0 ImageNet weights, the real CLI.
#   extract -> fit (regularization sweep, refit) -> evaluate on held-out test files -> predict
set -euo pipefail
DEMO=${DEMO:-build/demo}; PY=${PY:-.venv/bin/python}; PROBE=${PROBE:-.venv/bin/probe}
N_TRAIN=${DEMO_TRAIN:-3000}; N_TEST=${DEMO_TEST:-1000}
CACHE=$DEMO/cache
start=$(date +%s)

echo "== writing $N_TRAIN train + $N_TEST test Fashion-MNIST images as PNG files under $DEMO"
$PY - "$DEMO" "$N_TRAIN" "$N_TEST" <<'PYEOF'
import sys
from probe.datasets import fashion_mnist_folder
out, n_train, n_test = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fashion_mnist_folder(f"{out}/train", "train", n_train)
fashion_mnist_folder(f"{out}/test", "test", n_test)
PYEOF

echo; echo "== probe extract (EfficientNet-Lite0; a second run of this demo is all cache hits)"
$PROBE extract "$DEMO/train" "$DEMO/test" --cache "$CACHE"

echo; echo "== probe fit --clf logreg (C chosen on a 10% validation split, then refit on train+val), registered"
$PROBE fit "$DEMO/train" --clf logreg --cache "$CACHE" -o "$DEMO/model/model.probe" \
  --register fashion --registry "$DEMO/models"
$PROBE models list --registry "$DEMO/models"

echo; echo "== probe evaluate on the held-out test files"
$PROBE evaluate "$DEMO/model/model.probe" "$DEMO/test" --cache "$CACHE" -o "$DEMO/model/test-report"

echo; echo "== for context: logistic regression on raw pixels, same train/test files"
$PY demo/pixel_baseline.py "$DEMO/train" "$DEMO/test"

echo; echo "== probe drift: the test files against the champion's training inputs (features from the cache)"
status=0; $PROBE drift --model fashion --registry "$DEMO/models" "$DEMO/test" --cache "$CACHE" || status=$?
echo "(probe drift exit status $status: 0 = no drift, 3 = drift)"
[ "$status" -eq 0 ] || [ "$status" -eq 3 ]

echo; echo "== probe predict on held-out files (first rows)"
$PROBE predict "$DEMO/model/model.probe" "$DEMO/test" --cache "$CACHE" --top-k 3 -o "$DEMO/predictions.csv"
head -n 6 "$DEMO/predictions.csv" | cut -d, -f1,3-8
echo "(all $(($(wc -l < "$DEMO/predictions.csv") - 1)) predictions in $DEMO/predictions.csv)"

echo; echo "demo finished in $(( $(date +%s) - start ))s"
