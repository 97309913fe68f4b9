PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q -c constraints.txt

.PHONY: install serve test lint

install:
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'

serve: install
	tpa-serve --host 127.0.0.1 --port 8000

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .
