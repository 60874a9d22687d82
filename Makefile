# Set-up is part of every target: a fresh machine needs only `make train` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; pick your CUDA build with e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: install train test lint bench schema sweep clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m launchers.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check rl_loss launchers benchmarks tests

# glibc keeps big temporaries in the heap (no page faults on some calls only); passive OpenMP workers
# do not spin against the timed thread on a shared machine.
BENCH_ENV := MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 OMP_WAIT_POLICY=PASSIVE

bench: $(STAMP)
	$(BENCH_ENV) $(PY) -m benchmarks.reducers $(ARGS) 2>&1 | grep -v '^USDT:'  # torch.profiler's trace lines
	$(BENCH_ENV) $(PY) -m benchmarks.train_step
	$(BENCH_ENV) $(PY) -m benchmarks.trl_step

schema: $(STAMP)
	$(PY) -m launchers.schema --write

sweep: $(STAMP)
	$(PY) -m launchers.train -m loss=grpo,dapo,drgrpo,scalerl $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .hypothesis
