PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q -c constraints.txt

.PHONY: install serve test lint

install:
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'

serve: install
	tpa-generate --prompt "Why is the sky blue?" --max-tokens 32

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .
