# Two entry points: `make demo` runs the default experiment end to end,
# `make test` runs the test suite. Both create the virtual environment first.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# torch and torchvision must match exactly; these are the versions fdpipe is tested with.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
CORES ?= all

.PHONY: demo test env clean-results

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[test]' $(TORCH_PINS)
	touch $@

demo: env
	$(BIN)/fdpipe fetch-data
	$(BIN)/snakemake --cores $(CORES)

# pytest exits with 5 when it collected no test; treat that as a failure with a
# clear message, so that an empty run never looks like a passing one.
test: env
	@$(BIN)/python -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: check the tests/ folder"; fi; \
	exit $$rc

clean-results:
	rm -rf results .snakemake
