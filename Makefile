# Two commands do all set-up on a fresh machine with Python 3.11:
#   make demo   create .venv, install, pretrain on the embedded digits set, print k-NN results
#   make test   create .venv, install, run the whole test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install snapshots golden clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,faiss-cpu]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ssl_vil.demo --output-dir runs/demo

test: $(STAMP)
	$(PY) -m pytest -x -q --durations=15 tests

# Regenerate the resolved-recipe snapshots (tests/snapshots/) after an intended default change.
snapshots: $(STAMP)
	$(PY) tests/recipe_snapshots.py --write

clean:
	rm -rf runs

# Regenerate the golden 20-step loss file (tests/golden/) after an intended change of the numerics.
golden: $(STAMP)
	$(PY) tests/test_train_determinism.py --write
