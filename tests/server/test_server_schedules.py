"""Black-box: the real OpenAI server under the tight schedule of issue 18. A small pool, a
512-token step budget and vLLM's adaptive long-prefill threshold: budgeted long prompts
(block-wise prefill, evicting every chunk, then decoding) share every step with unbudgeted
probes, whose greedy answers must be stock vLLM's.

The budgeted requests' stats count the steps vLLM left them out of after they first evicted
(``steps_left_out``). Under FCFS this schedule does not produce such a step: a running request
is skipped only when the requests ahead of it spend the whole 512-token budget, which takes
four prefill chunks of 128 ahead (``threshold = max(128, 512 // eligible)``; with fewer than
five eligible requests, the ones ahead take less than 512 in all), and no request admitted
before a compacted one can still be prefilling four-deep once the compacted one was admitted
with budget to spare. ``tests/engine/test_engine_schedules.py`` therefore drives vLLM's own skip path
through a seam; this test keeps the end-to-end check and prints the count it saw.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = [pytest.mark.server, pytest.mark.engine]

FLAGS = [
    "--max-num-batched-tokens", "512", "--long-prefill-token-threshold", "128",
    "--long-prefill-token-threshold-adaptive", "--num-gpu-blocks-override", "32",
    "--max-model-len", "2048", "--no-enable-prefix-caching",
]  # fmt: skip


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory):
    from helpers.servers import own_server

    with own_server(tmp_path_factory.mktemp("tight"), "--gpu-memory-utilization", "0.3",
                    *FLAGS) as server:  # fmt: skip
        yield server


def test_probes_unchanged_beside_chunked_evictions_on_a_tight_schedule(tight_server, tmp_path):
    import requests
    from helpers.servers import stock_greedy
    from transformers import AutoTokenizer

    from benchmarks.tasks import filler_prompt_ids
    from vllm_caote.models import model_dir

    tok = AutoTokenizer.from_pretrained(model_dir())
    budgeted = [filler_prompt_ids(tok, 1400, 20000 * i) for i in range(4)]
    probes = [filler_prompt_ids(tok, 600, 100000 + 9000 * i) for i in range(3)]

    stock = stock_greedy([{"prompt_token_ids": p, "max_tokens": 24} for p in probes], tmp_path)

    def ask(prompt, max_tokens, **extra):
        body = {"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, **extra}  # fmt: skip
        r = requests.post(tight_server.url("/v1/completions"), json=body, timeout=900)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(len(budgeted) + len(probes)) as pool:
        evicting = [
            pool.submit(ask, p, 96, kv_budget=256, kv_policy="caote-snapkv", ignore_eos=True)
            for p in budgeted
        ]
        probe_futs = [pool.submit(ask, p, 24, return_token_ids=True) for p in probes]
        stats = [f.result()["kv_eviction"] for f in evicting]
        answers = [f.result() for f in probe_futs]

    assert all(s["evicted_tokens"] > 0 and "error" not in s for s in stats), stats
    assert all(s["eviction_events"] >= 1 for s in stats)
    print(
        "steps left out after eviction, per budgeted request:", [s["steps_left_out"] for s in stats]
    )
    for i, (want, got) in enumerate(zip(stock, answers, strict=True)):
        assert got["choices"][0]["token_ids"] == want, f"probe {i} changed beside evictions"
    assert requests.get(tight_server.url("/health"), timeout=10).status_code == 200
    assert "EngineCore encountered" not in tight_server.log_text()
