# Set-up is part of every target: a fresh machine needs only `make train` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; pick your CUDA build with e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: install train test lint bench schema sweep docs-sweep docs clean

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
	$(PY) -m ruff check rl_loss launchers benchmarks tests hydra_plugins

# glibc keeps big temporaries in the heap (no page faults on some calls only); passive OpenMP workers
# do not spin against the timed thread on a shared machine.
BENCH_ENV := MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 OMP_WAIT_POLICY=PASSIVE

bench: $(STAMP)
	$(BENCH_ENV) $(PY) -m benchmarks.reducers $(ARGS) 2>&1 | grep -v '^USDT:'  # torch.profiler's trace lines
	$(BENCH_ENV) $(PY) -m benchmarks.surrogates $(SURROGATE_ARGS)
	$(BENCH_ENV) $(PY) -m benchmarks.train_step
	$(BENCH_ENV) $(PY) -m benchmarks.trl_step

schema: $(STAMP)
	$(PY) -m launchers.config.schema --write

# Every preset in conf/loss (new ones join by themselves) over SEEDS, jobs in parallel (joblib), then the report.
comma := ,
empty :=
space := $(empty) $(empty)
PRESET_NAMES := $(sort $(basename $(notdir $(wildcard conf/loss/*.yaml))))
# grpo (the default) first: the report takes its differences against the first config.
PRESETS ?= $(subst $(space),$(comma),$(filter grpo,$(PRESET_NAMES)) $(filter-out grpo,$(PRESET_NAMES)))
SEEDS ?= 0,1,2
SWEEP_STAMP := $(shell date +%Y-%m-%d_%H-%M-%S)
SWEEP_DIR ?= multirun/sweep-$(SWEEP_STAMP)

sweep: $(STAMP)
	$(PY) -m launchers.train -m loss=$(PRESETS) seed=$(SEEDS) hydra/launcher=joblib progress=log \
		hydra.sweep.dir=$(SWEEP_DIR) $(ARGS)
	$(PY) -m launchers.report $(SWEEP_DIR) $(REPORT_ARGS)

# The sweep page's figure and table (docs/report.md): the sweep above into a fixed folder, reported into docs/sweep.{png,md}.
docs-sweep: $(STAMP)
	rm -rf multirun/docs-sweep
	$(MAKE) sweep SWEEP_DIR=multirun/docs-sweep REPORT_ARGS="--out docs --name sweep --metrics grad_norm,entropy"

# The documentation site (mkdocs.yml, docs/) into site/; warnings are errors.
docs: $(STAMP)
	$(PY) -m mkdocs build --strict

clean:
	rm -rf site $(VENV) outputs multirun .pytest_cache .hypothesis
