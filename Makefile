# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed
# a PyTorch wheel index to install torch from first, e.g. the CPU build's on a machine without a GPU:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: install demo readme docs test test-quick clean

install: $(STAMP)

# the demo needs only the runtime; the tests add pytest, hypothesis, snapshots, Ray and the docs builder
$(RUNTIME): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --quiet torch torchvision --index-url $(TORCH_INDEX),)
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/python -m pip install --quiet -e ".[test,docs]"
	touch $(STAMP)

# the demo writes only under results/ (its table is printed; results/demo/ holds the report)
demo: $(RUNTIME)
	$(BIN)/byol-runner run experiments/demo.yaml

# after `make demo`: the README's demo section and its page in the manual, from the demo's results
readme: $(RUNTIME)
	$(BIN)/byol-runner report --run demo --readme README.md

# the manual (mkdocs, material theme) into site/; --strict: a broken link or page fails
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test: $(STAMP)
	$(BIN)/python -m pytest

# the suite less its end-to-end tests (real runs, containers, Ray): a few minutes, for the edit-test loop;
# more pytest arguments in PYTEST_ARGS (make test-quick PYTEST_ARGS="-x tests/test_wiring.py")
test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) results/cache site
