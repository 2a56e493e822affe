# Two entry points (see README): `make demo` trains the main job, `make test` runs the whole test suite.
# Both create .venv and install everything first; re-running skips what is already there.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test setup system-deps bench

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0        # the CPU wheel: an open `torch` pulls a CUDA build
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

system-deps:                # pdsh + sshd for the multi-node tests (Debian packages; needs root)
	bash scripts/system_deps.sh

demo: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./launch.sh

test: $(VENV)/.installed system-deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest tests

bench: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/step_time.py
