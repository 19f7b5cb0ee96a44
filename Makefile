# vllm-caote: `make serve` and `make test` set everything up on first use.
SHELL := /bin/bash
VENV   ?= .venv
PY     := $(VENV)/bin/python
FLAVOR ?= cpu
HOST   ?= 127.0.0.1
PORT   ?= 8000
# MODEL: a local Hugging Face folder or a hub id; default the embedded SmolLM2 model.
MODEL  ?= $(shell CAOTE_HOME=$(CAOTE_HOME) python3 -c "import os,pathlib;print(pathlib.Path(os.environ.get('CAOTE_HOME') or pathlib.Path.home()/'.cache'/'vllm_caote')/'models'/'SmolLM2-135M-Instruct')")
# The embedded model is served as "smollm2"; a MODEL you pass keeps vLLM's own name (its id).
SERVED_FLAG := $(if $(filter file,$(origin MODEL)),--served-model-name smollm2)
ARGS   ?=
# CPU defaults: eager mode (torch.compile takes minutes on small machines) and fp32 (CPUs
# without AVX-512 BF16 run bf16 matmuls ~100x slower; see vllm_caote.models.engine_dtype).
DTYPE ?= $(if $(filter cuda,$(FLAVOR)),auto,float32)
ifeq ($(FLAVOR),cuda)
SERVE_FLAGS ?= --dtype $(DTYPE)
else
SERVE_FLAGS ?= --enforce-eager --gpu-memory-utilization 0.3 --dtype $(DTYPE)
endif
# Eviction is opt-in per request (kv_budget). DEFAULT_BUDGET=N sets a server-wide default
# through vLLM's --additional-config; 0 (the default) evicts only requests that ask.
DEFAULT_BUDGET ?= 0
# vLLM-CPU: KV cache size in GiB.
KVCACHE_GIB ?= 4
PYTEST_ARGS ?=

# What is installed, per flavour: serving only (make serve), or serving + tests/benchmarks.
SERVE_STAMP := $(VENV)/.vllm-caote-serve-$(FLAVOR)
STAMP := $(VENV)/.vllm-caote-dev-$(FLAVOR)

.PHONY: setup setup-serve serve test lint fmt bench bench-quality eval loadtest clean help
help:
	@echo "make serve | test | lint | bench | bench-quality | eval | loadtest | setup | setup-serve | clean"

setup-serve: $(SERVE_STAMP)

$(SERVE_STAMP): pyproject.toml scripts/install.sh
	@test -x $(PY) || python3 -m venv $(VENV)
	scripts/install.sh --python $(PY) --flavor $(FLAVOR) --editable --fetch-model
	@touch $@

setup: $(STAMP)

$(STAMP): $(SERVE_STAMP) scripts/system-deps.sh
	scripts/install.sh --python $(PY) --flavor $(FLAVOR) --dev --editable
	scripts/system-deps.sh
	@# Test-only peer: NVIDIA kvpress's presses, unpacked (not installed: its pins clash with ours).
	$(PY) -m pip download -q --no-deps --only-binary :all: kvpress==0.5.5 -d $(VENV)/kvpress-dl \
	  && $(PY) -m zipfile -e $(VENV)/kvpress-dl/kvpress-0.5.5-py3-none-any.whl $(VENV)/kvpress-src
	@# vLLM CUDA wheels' Python files (~170 MB kept), for the static check of compat.CONTACTS.
	$(PY) -m vllm_caote.compat_sources --fetch $(VENV)/vllm-sources
	@touch $@

serve: setup-serve
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-$(KVCACHE_GIB)} \
	$(PY) -m vllm.entrypoints.openai.api_server --model $(MODEL) $(SERVED_FLAG) \
	  --host $(HOST) --port $(PORT) $(SERVE_FLAGS) \
	  $(if $(filter-out 0,$(DEFAULT_BUDGET)),--additional-config '{"kv_eviction": {"default_budget": $(DEFAULT_BUDGET)}}') \
	  $(ARGS)

test: setup
	CAOTE_KVPRESS_SRC=$(if $(wildcard $(VENV)/kvpress-src/kvpress),$(VENV)/kvpress-src) \
	  $(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

fmt: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Engine benchmark (in-process). The serving benchmarks on a real OpenAI server: `make
# bench-quality` (quality at capacity) and `make bench-decode` (decode-heavy throughput).
bench: setup
	$(PY) -m benchmarks $(ARGS)

# Quality at capacity: retrieval prompts sent at once into a 40-block pool, stock vs policies.
bench-quality: setup
	$(PY) -m loadtest.quality --start-server $(ARGS)

# Decode-heavy throughput: 24 x (1024 prompt + 512 output) tokens at once into a 40-block pool,
# stock vs budgets at 4x and 8x compression, then perplexity at the same budgets (~20 min on 2
# cores). ARGS=--quick for a short check.
.PHONY: bench-decode
bench-decode: setup
	$(PY) -m loadtest.decode --start-server $(ARGS)

# Conversations under a budget: 3 conversations x 7 turns over a 1.5k-token document through
# the OpenAI server, stock vs kv_budget 512 resuming each turn from the kept compacted cache.
.PHONY: bench-sessions
bench-sessions: setup
	$(PY) -m loadtest.sessions --start-server $(ARGS)

eval: setup
	$(PY) -m benchmarks.eval $(ARGS)

# Paired CAOTE-X vs X on hundreds of held-out prompts, torch-only offline harness (no engine):
# answer log-probability differences with 95% intervals. ARGS=--device cuda for the full size.
.PHONY: eval-paired
eval-paired: setup
	$(PY) -m benchmarks.paired $(ARGS)

loadtest: setup
	$(PY) -m loadtest $(ARGS)

# Deployment images, built and run with podman from local Debian bases (no registry needed):
# vllm-caote:cpu served and checked, the compose stack with Prometheus, the CUDA Dockerfile on
# a stand-in base. Also run by `make test` (tests/deploy/test_deploy.py). ARGS=phases, e.g. ARGS=serve.
.PHONY: image-test
image-test:
	scripts/system-deps.sh
	scripts/image-test.sh $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
