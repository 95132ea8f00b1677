# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed

.PHONY: install demo test test-quick clean

install: $(STAMP)

# the demo needs only the runtime; the tests add pytest, hypothesis, snapshots and Ray
$(RUNTIME): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(RUNTIME)
	$(BIN)/byol-runner run experiments/demo.yaml --readme README.md

test: $(STAMP)
	$(BIN)/python -m pytest

# the suite less its end-to-end tests (real runs, containers, Ray): a few minutes, for the edit-test loop;
# more pytest arguments in PYTEST_ARGS (make test-quick PYTEST_ARGS="-x tests/test_wiring.py")
test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) results/cache
