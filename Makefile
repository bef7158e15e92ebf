# `make demo` and `make test` do all the set-up on a fresh Debian 12 machine (as root).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup host venv demo test unit integration clean

setup: host venv

host:
	bash scripts/setup-host.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/vmhost demo

test: setup
	$(VENV)/bin/pytest -q -rf tests

unit: venv
	$(VENV)/bin/pytest -q tests/unit

integration: setup
	$(VENV)/bin/pytest -q -rf tests/integration

clean:
	rm -rf $(VENV) build *.egg-info
