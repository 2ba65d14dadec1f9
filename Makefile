# Two commands do all set-up on a fresh machine with Python 3.11:
#   make demo   create .venv, install, pretrain on the embedded digits set, print k-NN results
#   make test   create .venv, install, run the whole test suite
# Any Python >= 3.11 (pyproject's requires-python): the first of these found, unless PYTHON=/path/to/python is given.
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3; do command -v $$p >/dev/null 2>&1 && \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; done)
# Extra wheel index for torch/torchvision, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu on a machine
# without a GPU (CPU wheels, ~200 MB instead of ~6 GB of CUDA wheels).
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install compare snapshots golden clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "no python >= 3.11 found on PATH; run: make PYTHON=/path/to/python3.11 ..."; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,faiss-cpu,kernels]' $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ssl_vil.demo --output-dir runs/demo

test: $(STAMP)
	$(PY) -m pytest -x -q --durations=15 tests

# ViL vs ViT, block designs and poolings under one recipe (recipes/compare/digits.yaml, ~30 CPU-minutes);
# `make compare ARGS=--quick` is the 2-step smoke run, ARGS="--only vil2_alternating vit_matched" a subset.
ARGS ?=
compare: $(STAMP)
	$(PY) -m ssl_vil.compare --config recipes/compare/digits.yaml --output-dir runs/compare $(ARGS)

# Regenerate the resolved-recipe snapshots (tests/snapshots/) after an intended default change.
snapshots: $(STAMP)
	$(PY) tests/recipe_snapshots.py --write

clean:
	rm -rf runs

# Regenerate the golden 20-step loss file (tests/golden/) after an intended change of the numerics.
golden: $(STAMP)
	$(PY) tests/test_train_determinism.py --write
