# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU-only machine with the CPU wheel on disk (see ../shared/docs/environment.md) pins it so that pip
# never pulls the multi-GB CUDA build; elsewhere install whatever torch the platform offers.
TORCH_SPEC ?= $(shell ls /opt/wheels/torch-2.13.0*cpu*.whl >/dev/null 2>&1 && echo torch==2.13.0 || echo torch)

.PHONY: demo test lint typecheck pytest clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e ".[dev,milvus,pretrained,cluster]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/modret demo

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(VENV)/bin/mypy

pytest: $(VENV)/.installed-dev
	$(VENV)/bin/pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
