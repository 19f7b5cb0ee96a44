#!/usr/bin/env bash
# Powered paired runs for issue #32 items 2 and 4 on one GPU (about 300 s of runs on an H200):
#   paired_paper           CAOTE-X (alpha from the base's pooled scores) vs caote-X+paper (the
#                          paper's form: each window query's attention rows, pooled after) vs X,
#                          for snapkv, tova, h2o, keydiff; streaming for item 4
#   paired_paper_recent_*  language modelling at kv_eviction.recent 0 / 0.25 / 0.5 for the best
#                          CAOTE policy on LM (caote-snapkv, both forms) against streaming
#   paired_paper_lookalike look-alike distractors
#
# The GPU machine has no network: make the prompts first, on any machine with the tokenizer:
#   python -m benchmarks.paired --prompts 240 --lm-prompts 96 --dump-cases "$CASES/paper.json"
#   python -m benchmarks.paired --prompts 0 --lm-prompts 64 --dump-cases "$CASES/recent.json"
#   python -m benchmarks.paired --prompts 0 --lm-prompts 0 --lookalike 120 \
#       --dump-cases "$CASES/lookalike.json"
# then: CASES=dir MODEL=hf-model-dir COMMIT=sha OUT=dir bash benchmarks/paired_paper_gpu.sh
# (--max-seconds caps each run's prompts; the reports say how many were read).
set -euo pipefail
: "${CASES:?folder of the dumped cases}" "${MODEL:?the model folder}" "${OUT:?output folder}"
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
PY=${PY:-python}

run() {
    local tag=$1
    shift
    "$PY" -m benchmarks.paired --device cuda --model "$MODEL" --commit "$COMMIT" \
        --out "$OUT/$tag" --tag "$tag" "$@"
}

forms() { # X, caote-X, caote-X+paper for each base given
    local out=()
    for b in "$@"; do out+=("$b" "caote-$b" "caote-$b+paper"); done
    (IFS=,; echo "${out[*]}")
}

run paired_paper --cases "$CASES/paper.json" --bases snapkv,tova,h2o,keydiff \
    --policies "$(forms snapkv tova h2o keydiff),streaming" --max-seconds 150
for r in 0 0.25 0.5; do
    run "paired_paper_recent_${r/./}" --cases "$CASES/recent.json" --bases snapkv --recent "$r" \
        --policies streaming,snapkv,caote-snapkv,caote-snapkv+paper --max-seconds 20
done
run paired_paper_lookalike --cases "$CASES/lookalike.json" --bases snapkv,tova --lookalike 120 \
    --policies "$(forms snapkv tova),streaming" --max-seconds 45
