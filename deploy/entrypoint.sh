#!/usr/bin/env bash
# Container entry point of the vllm-caote images (Dockerfile, deploy/Dockerfile.cpu).
#
#   entrypoint.sh [--dry-run] [extra vLLM server args...]
#
# Starts vLLM's own OpenAI server with stock flags; the plugin loads itself through the
# vllm.general_plugins entry point and configures what it needs (or refuses a conflicting flag
# at startup, naming it). Every extra argument is passed through unchanged, e.g.
# --tensor-parallel-size 2.
# --dry-run prints the command instead of running it (and fetches nothing).
#
# Environment (all optional):
#   MODEL                      local folder or hub id; unset = the embedded SmolLM2 model, fetched
#                              on first start into $CAOTE_HOME (a volume in the images)
#   SERVED_MODEL_NAME          name clients use; default "smollm2" for the embedded model
#   HOST, PORT                 default 0.0.0.0 and 8000
#   ENFORCE_EAGER         1 adds --enforce-eager (the CPU image sets it)
#   DTYPE                      adds --dtype (the CPU image sets float32: bf16 is ~100x slower on
#                              CPUs without AVX-512 BF16)
#   GPU_MEMORY_UTILIZATION     adds --gpu-memory-utilization
#   MAX_MODEL_LEN              adds --max-model-len
#   PYTHON                     interpreter with vLLM and vllm-caote; default python3
#   CAOTE_DEFAULT_BUDGET, CAOTE_DEFAULT_POLICY, CAOTE_HOME, VLLM_CPU_KVCACHE_SPACE
#                              read by the plugin / vLLM themselves
set -euo pipefail

PY="${PYTHON:-python3}"
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi

truthy() {
  case "${1,,}" in 1 | true | yes | on) return 0 ;; *) return 1 ;; esac
}

# A --model among the pass-through arguments wins over $MODEL.
user_model=0
for arg in "$@"; do
  case "$arg" in
    --model | --model=*) user_model=1 ;;
  esac
done

model_args=()
if [ "$user_model" = 0 ]; then
  if [ -z "${MODEL:-}" ]; then
    MODEL="$("$PY" -m vllm_caote.models path)"
    SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-smollm2}"
    if [ ! -f "$MODEL/.complete" ]; then
      fetch=("$PY" -m vllm_caote.models fetch model)
      if [ "$DRY_RUN" = 1 ]; then
        echo "fetch: ${fetch[*]}"
      else
        echo "entrypoint: fetching the embedded model into $MODEL (first start)" >&2
        caote_home="$(dirname "$(dirname "$MODEL")")" # $CAOTE_HOME/models/<name>
        mkdir -p "$caote_home"
        if command -v flock >/dev/null 2>&1; then
          # Replicas sharing one volume: one fetches, the others wait and find it done.
          flock "$caote_home/.fetch.lock" "${fetch[@]}"
        else
          "${fetch[@]}"
        fi
      fi
    fi
  fi
  model_args=(--model "$MODEL")
fi

cmd=("$PY" -m vllm.entrypoints.openai.api_server "${model_args[@]}"
  --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}")
[ -n "${SERVED_MODEL_NAME:-}" ] && cmd+=(--served-model-name "$SERVED_MODEL_NAME")
truthy "${ENFORCE_EAGER:-0}" && cmd+=(--enforce-eager)
[ -n "${DTYPE:-}" ] && cmd+=(--dtype "$DTYPE")
[ -n "${GPU_MEMORY_UTILIZATION:-}" ] && cmd+=(--gpu-memory-utilization "$GPU_MEMORY_UTILIZATION")
[ -n "${MAX_MODEL_LEN:-}" ] && cmd+=(--max-model-len "$MAX_MODEL_LEN")
cmd+=("$@")

if [ "$DRY_RUN" = 1 ]; then
  printf 'exec:'
  printf ' %q' "${cmd[@]}"
  printf '\n'
  exit 0
fi
echo "entrypoint: default kv budget=${CAOTE_DEFAULT_BUDGET:-none (opt-in per request)}" \
  "model=${MODEL:-(from args)}" >&2
exec "${cmd[@]}"
