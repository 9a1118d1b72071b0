# flowserve: `make run` serves the default models, `make test` runs the test suite.
# Both set up everything they need (a virtual environment in .venv) on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000
TORCH_VERSION ?= 2.13.0

.PHONY: setup system-deps run test models bench anomaly-bench clean cluster

# torch first, at the pinned CPU build, so that no dependency pulls a CUDA build; then the Python client
# (clients/python, its own distribution: the CLI's --url mode and the tests use it), then the service.
$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e ./clients/python
	$(PIP) install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/flowserve serve --model-dir models --host $(HOST) --port $(PORT)

# Debian tools some tests drive for real (scripts/system-deps.sh; skipped tests say which is missing).
system-deps:
	@bash scripts/system-deps.sh

test: setup system-deps
	$(PY) -m pytest -q

# `make cluster`: 3 replicas behind HAProxy on http://127.0.0.1:8080 (deploy/local/cluster.py)
REPLICAS ?= 3
cluster: setup system-deps
	$(PY) -m deploy.local.cluster up --replicas $(REPLICAS) --port 8080 --model-dir models --models moons

models: setup
	$(PY) -m service.training.default_models --model-dir models

# `make bench` (full, ~10 min) or `make bench BENCH_ARGS=--quick` (a smoke run): see bench/README.md.
# wrk from Debian is installed when absent (else the harness's Python load generator is used).
bench: setup
	@command -v wrk >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null) \
		|| echo "bench: could not install wrk; using the Python load generator"
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PIP) install --quiet -e '.[dev,bench]'
	@test -d models/moons -a -d models/digits || $(MAKE) models
	$(PY) -m bench $(BENCH_ARGS)

# `make anomaly-bench`: flowserve beside PyOD's detectors on small offline anomaly sets (bench/anomaly,
# ~3 min on 2 cores; ANOMALY_ARGS="--seeds 2 --sets iris" for a smoke run), then the same sets on seeds
# 10-29, a draw the defaults were not settled on (~4 min; ANOMALY_LATER_ARGS= to skip it).
ANOMALY_ARGS ?= --sets breast-cancer,wine,iris,moons --seeds 10
ANOMALY_LATER_ARGS ?= --sets breast-cancer,wine,iris,moons --seeds 20 --first-seed 10
anomaly-bench: setup
	@$(PY) -c "import pyod" 2>/dev/null || $(PIP) install --quiet -e '.[dev,bench]'
	$(PY) -m bench.anomaly $(ANOMALY_ARGS)
	$(if $(strip $(ANOMALY_LATER_ARGS)),$(PY) -m bench.anomaly $(ANOMALY_LATER_ARGS))

clean:
	rm -rf $(VENV) .pytest_cache
