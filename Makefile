# Two set-up-free entry points: `make demo` (the main job on the embedded
# synthetic data set) and `make test` (the whole suite). Each builds .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv venv-test clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# constraints.txt: the versions the suite passed with (a fresh clone installs those).
PIP_C := $(BIN)/pip install -q -c constraints.txt

$(VENV)/.runtime: requirements.txt requirements-detect.txt constraints.txt pyproject.toml $(BIN)/activate
	$(PIP_C) -r requirements.txt
	$(PIP_C) --no-deps -r requirements-detect.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.test: requirements-test.txt constraints.txt $(VENV)/.runtime
	$(PIP_C) -r requirements-test.txt
	touch $@

venv: $(VENV)/.runtime
venv-test: $(VENV)/.test

demo: $(VENV)/.runtime
	$(BIN)/python -m qcs_jax.train --config configs/synthetic.py --workdir $${WORKDIR:-runs/synthetic}

test: $(VENV)/.test
	$(BIN)/python -m pytest -n 2 -q tests

clean:
	rm -rf $(VENV) runs
