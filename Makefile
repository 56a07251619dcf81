# The two entry points of the README: `make run` (the service, `sluice up`) and `make test`.
# Both create .venv on first use; nothing else needs to be installed by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU machine gets the CPU build of torch; pinning it before the project
# install keeps pip from resolving torch to a CUDA build.
TORCH_PIN ?= torch==2.13.0 triton==3.7.1

.PHONY: install run test lint clean

$(BIN)/sluice: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

install: $(BIN)/sluice

run: install
	$(BIN)/sluice up

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
