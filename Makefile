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

.PHONY: demo test install compare snapshots golden clean gpu-wheels

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

# The pure-Python wheels a GPU machine without a package index lacks, into gpu-wheels/ (ignored by git), for
# bench/gpu_check.py (its docstring gives the two commands to run there). That machine's Python has torch + CUDA,
# timm, tensorboard, safetensors and their dependencies (numpy, Pillow, PyYAML, packaging, tqdm, ...). Carried:
# pytest and its dependencies (the gpu-marked tests; exceptiongroup and tomli only for a Python 3.10 there),
# pytest-timeout (pyproject's timeout), mlstm-kernels + einops (the Triton mLSTM backend), webdataset + braceexpand
# (the training data path), setuptools (the offline editable install). Not carried: numba, scikit-learn, matplotlib
# (not pure Python; gpu_check's imports never reach them, tests/test_bench_gpu_check.py checks it) and submitit
# (cluster/ only).
GPU_WHEELS := pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 exceptiongroup==1.3.1 tomli==2.4.0 \
	pytest-timeout==2.4.0 mlstm-kernels==2.0.6 einops==0.8.2 webdataset==1.0.2 braceexpand==0.1.7 setuptools==84.2.1
gpu-wheels:
	@test -n "$(PYTHON)" || { echo "no python >= 3.11 found on PATH; run: make PYTHON=/path/to/python3.11 ..."; exit 1; }
	rm -rf gpu-wheels
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --platform any -d gpu-wheels $(GPU_WHEELS)
	@# --platform any picks the pure wheel where a package also ships compiled ones (tomli); a platform wheel here
	@# would not match the GPU machine.
	@! ls gpu-wheels | grep -v -- '-none-any\.whl$$' || { echo "gpu-wheels: the wheels above are not pure Python"; exit 1; }
	@ls gpu-wheels
