# Set-up is part of every target: a fresh machine needs only `make train` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; pick your CUDA build with e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: install train test test-verl lint bench schema sweep docs-sweep docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m launchers.train $(ARGS)

# One pytest-xdist worker per core (-n auto); each test file runs whole on one worker (--dist loadfile), so
# a file's module fixtures (a built wheel, a trained run) are made once. PYTEST_ARGS adds options.
PYTEST_XDIST ?= -n auto --dist loadfile
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_XDIST) $(PYTEST_ARGS)
	$(MAKE) test-verl

# verl in a venv of its own (verl's transformers pin differs from TRL's): the CPU torch build first (so verl's
# requirement does not pull a CUDA one), then verl, then rl-loss editable without dependencies plus what its
# import and the tests need. An install that fails fails the target: the verl tests never skip.
VERL_VENV ?= .venv-verl
VERL_PY := $(VERL_VENV)/bin/python
VERL_SPEC ?= verl==0.9.1
# the +cpu build from PyTorch's CPU index (PyPI's Linux torch wheel is the CUDA one)
VERL_TORCH_SPEC ?= torch==2.13.0+cpu --extra-index-url https://download.pytorch.org/whl/cpu
VERL_STAMP := $(VERL_VENV)/.installed

$(VERL_STAMP): pyproject.toml
	test -x $(VERL_PY) || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_PY) -c "import torch" 2>/dev/null || $(VERL_PY) -m pip install -q $(VERL_TORCH_SPEC)
	$(VERL_PY) -m pip install -q "$(VERL_SPEC)" "pydantic>=2.7,<3" "typing-extensions>=4.7" "pytest>=8"
	$(VERL_PY) -m pip install -q --no-deps -e .
	touch $(VERL_STAMP)

test-verl: $(VERL_STAMP)
	$(VERL_PY) -m pytest -q -p no:cacheprovider tests_verl $(VERL_PYTEST_ARGS)

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
	rm -rf $(VERL_VENV)
