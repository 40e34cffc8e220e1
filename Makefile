# Two entry points: `make test` and `make run`. Both create .venv and install pinned versions first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= passk_k4

.PHONY: test run install bench clean

$(STAMP): setup.cfg constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 -c constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

run: $(STAMP)
	$(PY) -m experiments.run --config=$(CONFIG)

bench: $(STAMP)
	$(PY) -m bench.advantages

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
