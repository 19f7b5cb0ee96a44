# vllm-caote: `make serve` and `make test` set everything up on first use.
SHELL := /bin/bash
VENV   ?= .venv
PY     := $(VENV)/bin/python
FLAVOR ?= cpu
HOST   ?= 127.0.0.1
PORT   ?= 8000
# MODEL: a local Hugging Face folder or a hub id; default the embedded SmolLM2 model.
MODEL  ?= $(shell CAOTE_HOME=$(CAOTE_HOME) python3 -c "import os,pathlib;print(pathlib.Path(os.environ.get('CAOTE_HOME') or pathlib.Path.home()/'.cache'/'vllm_caote')/'models'/'SmolLM2-135M-Instruct')")
SERVED ?= smollm2
ARGS   ?=
# CPU defaults: eager mode (torch.compile takes minutes on small machines) and fp32 (CPUs
# without AVX-512 BF16 run bf16 matmuls ~100x slower; see vllm_caote.models.engine_dtype).
DTYPE ?= $(if $(filter cuda,$(FLAVOR)),auto,float32)
SERVE_FLAGS ?= --enforce-eager --gpu-memory-utilization 0.3 --dtype $(DTYPE)
# Eviction is on by default for `make serve`: requests without their own kv_budget get this one
# (the environment's CAOTE_DEFAULT_BUDGET wins; 0 turns the default off).
DEFAULT_BUDGET ?= 1024
# vLLM-CPU: KV cache size in GiB.
KVCACHE_GIB ?= 4
PYTEST_ARGS ?=

STAMP := $(VENV)/.vllm-caote-setup

.PHONY: setup serve test lint fmt bench eval loadtest clean help
help:
	@echo "make serve | test | lint | bench | eval | loadtest | setup | clean"

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh scripts/system-deps.sh
	@test -x $(PY) || python3 -m venv $(VENV)
	scripts/install.sh --python $(PY) --flavor $(FLAVOR) --dev --editable --fetch-model
	scripts/system-deps.sh
	@# Test-only peer: NVIDIA kvpress's presses, unpacked (not installed: its pins clash with ours).
	-$(PY) -m pip download -q --no-deps --only-binary :all: kvpress==0.5.5 -d $(VENV)/kvpress-dl \
	  && $(PY) -m zipfile -e $(VENV)/kvpress-dl/kvpress-0.5.5-py3-none-any.whl $(VENV)/kvpress-src
	@touch $@

serve: setup
	CAOTE_DEFAULT_BUDGET=$${CAOTE_DEFAULT_BUDGET:-$(DEFAULT_BUDGET)} \
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-$(KVCACHE_GIB)} \
	$(PY) -m vllm.entrypoints.openai.api_server --model $(MODEL) --served-model-name $(SERVED) \
	  --host $(HOST) --port $(PORT) --no-enable-prefix-caching $(SERVE_FLAGS) $(ARGS)

test: setup
	CAOTE_KVPRESS_SRC=$(if $(wildcard $(VENV)/kvpress-src/kvpress),$(VENV)/kvpress-src) \
	  $(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

fmt: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: setup
	$(PY) -m vllm_caote.bench $(ARGS)

eval: setup
	$(PY) -m vllm_caote.eval $(ARGS)

loadtest: setup
	$(PY) -m loadtest $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
