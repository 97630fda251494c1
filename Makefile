# The two commands: `make train` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny_dense.yaml
# Extra `key=value` overrides for `make train`, e.g. ARGS="train.steps=50".
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install fetch train test

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Downloads (once, hash-checked) the default corpus into ~/.cache/ultramem_jax.
fetch: install
	$(PY) -m ultramem_jax.data.corpora fetch wiki

train: fetch
	$(PY) train.py --config $(CONFIG) $(ARGS)

# 8 emulated CPU devices, as the sharding tests expect.
test: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
	  $(PY) -m pytest -q $(PYTEST_ARGS)
