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

# two test processes, a test file each at a time (its module fixtures stay in one process): most
# tests wait on servers, clusters and subprocesses, so two share the 2-core CI machine well. The
# whole suite: 767 s against 1,214 s in one process (here, 2026-11-30, one run each). Files go out
# slowest first (tests/conftest.py's order; xdist's own puts files of many tests first)
test: install
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

bench: install
	$(PYTHON) bench/bench_engine.py
	$(PYTHON) bench/bench_pipeline.py
	$(PYTHON) bench/bench_detectors.py
	$(PYTHON) bench/bench_tiling.py
