# flowserve: `make run` serves the default models, `make test` runs the test suite.
# Both set up everything they need (a virtual environment in .venv) on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000
TORCH_VERSION ?= 2.13.0

.PHONY: setup run test models bench clean

# torch first, at the pinned CPU build, so that no dependency pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/flowserve serve --model-dir models --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest -q

models: setup
	$(PY) -m service.default_models --model-dir models

clean:
	rm -rf $(VENV) .pytest_cache
