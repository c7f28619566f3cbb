# Two commands set up a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_DIR ?= demo_run

.PHONY: demo test install bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch pinned in pyproject (2.14.1): it installs from local disk here.
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/brvo-augment demo $(RUN_DIR)

# One pytest-xdist worker per CPU, each with its share of torch's threads (tests/conftest.py);
# `.venv/bin/python -m pytest` alone runs serially.
test: $(BIN)/.installed
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -n logical

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/preprocess_bench.py
	$(BIN)/python benchmarks/train_bench.py
	$(BIN)/python benchmarks/crgan_bench.py

clean:
	rm -rf $(RUN_DIR) .pytest_cache
