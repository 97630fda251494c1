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

# 8 emulated CPU devices, as the sharding tests expect. Two pytest workers
# (one per core of the reference machine), each taking whole files so
# module fixtures are built once, the longest files first (the order of
# tests/conftest.py, which xdist's reordering would undo); XLA's cheaper
# LLVM passes and its CPU backend's older fusion emitters, since the tests
# spend most of their time compiling small programs (with the new MLIR
# emitters tests/test_sharding.py took 2.3x the CPU, docs/testing.md).
# TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
TEST_XLA_FLAGS ?= --xla_force_host_platform_device_count=8 \
  --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true \
  --xla_cpu_use_fusion_emitters=false
test: install
	XLA_FLAGS="$(TEST_XLA_FLAGS)" JAX_PLATFORMS=cpu \
	  $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
	  $(PYTEST_ARGS)
