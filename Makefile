# Two commands on a fresh offline machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU torch first (a wheel that lies on disk here); a bare 'torch' would pull a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Train the default English XNLI prompt on the embedded backbone, then apply it unchanged to
# other languages (full dev sets) and print the table.
demo: $(STAMP)
	$(BIN)/xprompt train --task xnli --lang en
	$(BIN)/xprompt eval --task xnli --langs en,de,fr,es,ru,zh,ar,hi,sw

# Unit tests on tiny models and the integration tests on the real embedded backbone, one pytest-xdist
# worker per CPU core (each computing on one thread); TEST_WORKERS=0 runs them in this one process.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/python -m pytest -m 'not slow' -n $(TEST_WORKERS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m 'not slow and not integration' -n $(TEST_WORKERS)

clean:
	rm -rf $(VENV) runs .pytest_cache
