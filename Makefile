# Quick start: `make demo` (creates .venv, installs, runs the main job), `make test` (runs the tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
OUT    ?= out

.PHONY: demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# One stamp per set of extras: a failed install leaves no stamp and fails the target loudly.
$(VENV)/.installed-%: setup.py | $(BIN)/python
	$(BIN)/pip install -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-bench
	$(BIN)/python -m cosched.cli demo --out $(OUT)/demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(VENV)/.installed-bench
	$(BIN)/python -m pytest benchmarks -q --benchmark-columns=median,iqr,rounds

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info .pytest_cache
