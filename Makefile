# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/byol-runner run experiments/demo.yaml --readme README.md

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) results/cache
