# The two commands of the README: `make demo` (restore the bundled sample) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

demo: setup
	$(VENV)/bin/napari-restore demo --out outputs/demo

test: setup
	$(PY) -m pytest -q
