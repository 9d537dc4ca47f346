# probe — `make demo`, `make test`, `make bench`. Each target creates/refreshes .venv itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROBE := $(VENV)/bin/probe
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
DEMO := build/demo
DEMO_TRAIN ?= 3000
DEMO_TEST ?= 1000

.PHONY: venv data browser demo test bench clean

# torch/torchvision are pinned here (a matching pair); pyproject.toml keeps ranges.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[weights,fast,serve,ray,dev]'
	touch $(STAMP)

venv: $(STAMP)

# Real data: Debian's dataset-fashion-mnist (installed when missing and possible).
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ] || [ -n "$$PROBE_FASHION_MNIST" ]; then exit 0; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	else echo "Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist (or set PROBE_FASHION_MNIST)"; exit 1; fi

# Headless Chromium + ChromeDriver for the browser test of `probe serve`'s page (Debian packages; installed when
# missing and possible, otherwise that one test is skipped with its reason printed).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || \
	  echo "could not install chromium + chromium-driver; the browser test will be skipped"; \
	else echo "chromium + chromium-driver missing (apt-get install chromium chromium-driver); the browser test will be skipped"; fi

demo: venv data
	DEMO=$(DEMO) DEMO_TRAIN=$(DEMO_TRAIN) DEMO_TEST=$(DEMO_TEST) PY=$(PY) PROBE=$(PROBE) bash demo/run.sh

test: venv browser
	$(PY) -m pytest -q -rs

bench: venv data
	$(PY) benchmarks/run_all.py

clean:
	rm -rf build .pytest_cache
