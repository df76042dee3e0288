# Two entry points for a fresh machine: `make evaluate` (install + the main job on MTD) and
# `make test` (install + the test suite). Both create the virtualenv on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
MTD_SPLIT ?= ../shared/datasets/mtd/split.csv
OUT ?= runs/mtd

.PHONY: install evaluate test bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	# the CPU build of torch; an unpinned torch would pull a multi-GB CUDA build
	$(PYTHON) -m pip install -q torch==2.13.0
	# timm's metadata asks for torchvision, whose PyPI wheels cannot load beside CPU torch;
	# patchwatch never uses it (see anomaly/backbone.py)
	$(PYTHON) -m pip install -q --no-deps timm==1.0.31
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

evaluate: install
	$(VENV)/bin/patchwatch evaluate $(MTD_SPLIT) --out $(OUT)

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) bench/bench_engine.py
	$(PYTHON) bench/bench_pipeline.py
	$(PYTHON) bench/bench_detectors.py
	$(PYTHON) bench/bench_tiling.py
