# Two commands set up everything on a fresh machine:
#   make demo   -> .venv, install, run the embedded default end to end
#   make test   -> .venv, install (with dev tools), run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: venv install demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned, so that resolving the project never pulls another torch build; constraints.txt holds
# the versions that pip's resolver would otherwise backtrack through (see its header).
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]' $(TORCH_PIN)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/kdcache demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) kdcache-demo
