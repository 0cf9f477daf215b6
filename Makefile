# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install what is missing (torch from the local wheel cache) and build the
# embedded world (cached under $GRAMVL_HOME, default ~/.cache/gramvl) before running.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gramvl-installed

.PHONY: demo test world install lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import gramvl, torch, open_clip"
	touch $(STAMP)

install: $(STAMP)

world: $(STAMP)
	$(PY) -m gramvl world build

demo: world
	$(PY) -m gramvl demo

test: world
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check gramvl tests benchmarks

clean-venv:
	rm -rf $(VENV)
