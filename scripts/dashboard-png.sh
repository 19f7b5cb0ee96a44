#!/usr/bin/env bash
# Render the Grafana dashboard from real data: a real server (small pool), our own Prometheus
# scraping it, the quick load test as traffic, then deploy/grafana/render_png.py.
#   scripts/dashboard-png.sh [OUT.png]        (default docs/dashboard.png; needs `make setup`)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/dashboard.png}
py=${PY:-.venv/bin/python}
port=${PORT:-8011}
prom_port=${PROM_PORT:-9091}
command -v prometheus >/dev/null || { echo "prometheus not found (make setup installs it)" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -- "-$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

model=$("$py" -c "from benchmarks.eval.common import resolve_model; print(resolve_model(None))")
echo ">>> server on :$port (40-block pool), log $work/server.log"
VLLM_CPU_KVCACHE_SPACE=4 setsid "$py" -m vllm.entrypoints.openai.api_server --model "$model" \
  --served-model-name smollm2 --host 127.0.0.1 --port "$port" --enforce-eager \
  --gpu-memory-utilization 0.3 --dtype float32 --max-model-len 4096 \
  --num-gpu-blocks-override 40 >"$work/server.log" 2>&1 &
pids+=($!)
cat >"$work/prometheus.yml" <<YML
global: {scrape_interval: 2s, evaluation_interval: 2s}
scrape_configs:
  - job_name: vllm
    static_configs: [{targets: ["127.0.0.1:$port"]}]
YML
setsid prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
  --web.listen-address="127.0.0.1:$prom_port" --log.level=warn >"$work/prometheus.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 2
done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { tail -30 "$work/server.log"; exit 1; }
start=$(date +%s)
echo ">>> traffic: python -m loadtest --quick --parts mixed,capacity"
"$py" -m loadtest --url "http://127.0.0.1:$port" --quick --parts mixed,capacity \
  --out "$work/loadtest" >/dev/null
sleep 10  # a few more scrapes after the last request
"$py" deploy/grafana/render_png.py --prometheus "http://127.0.0.1:$prom_port" \
  --start "$((start - 30))" --out "$out"
