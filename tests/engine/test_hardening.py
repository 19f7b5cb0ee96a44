"""No budgeted request can corrupt another or kill the engine (issues 11 and 14), on the real
vLLM-CPU engine and SmolLM2, with vLLM's defaults (prefix caching on).

One in-process engine serves the module (its scheduler, KV cache manager and worker are read
directly); the fp8 test starts its own OpenAI server, as the failure it guards against was one.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch

pytestmark = pytest.mark.engine

BUDGET = 256


@pytest.fixture(scope="module")
def llm():
    from benchmarks.eval.common import close_llm, make_llm

    engine = make_llm(
        None, max_model_len=4096, kv_space_gib=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    )
    yield engine
    close_llm(engine)


def _core(llm):
    return llm.llm_engine.engine_core.engine_core


def _worker_eviction(llm):
    runner = _core(llm).model_executor.driver_worker.worker.model_runner
    return runner.caote


def _params(max_tokens, budget=None, policy=None):
    from benchmarks.eval.common import sampling

    return sampling(max_tokens, budget=budget, policy=policy, ignore_eos=True)


def _run(llm, requests):
    """Add ``(request_id, prompt_ids, params)`` and step the engine to completion.
    Returns ({request_id: RequestOutput}, blocks freed by eviction meanwhile)."""
    engine = llm.llm_engine
    sched = _core(llm).scheduler
    freed_before = sched.caote.freed_blocks_total
    for rid, ids, params in requests:
        engine.add_request(rid, {"prompt_token_ids": ids}, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o
    return outputs, sched.caote.freed_blocks_total - freed_before


def _prompts(llm):
    from benchmarks.tasks import filler_prompt_ids

    tok = llm.get_tokenizer()
    a = filler_prompt_ids(tok, 1100, 0)
    b = filler_prompt_ids(tok, 900, 40000)
    overlap = a[:700] + filler_prompt_ids(tok, 400, 80000)  # shares 5 blocks of a's prefix
    return a, b, overlap


def _tokens(out) -> list[int]:
    return list(out.outputs[0].token_ids)


def test_failed_compaction_frees_nothing_and_the_request_runs_without_eviction(llm):
    """A worker that skips a planned compaction (the plugin's fault-injection seam): the
    scheduler frees none of that request's blocks, recomputes it without eviction, says so in
    its stats, and the other requests' outputs do not change."""
    a, b, _ = _prompts(llm)
    pool = _core(llm).scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    base, _ = _run(llm, [("base-a", a, _params(24)), ("base-b", b, _params(24))])

    assert llm.reset_prefix_cache()  # the budgeted request computes (and evicts) all of it
    ev = _worker_eviction(llm)
    ev.skip_compaction = lambda rid: rid.startswith("faulty")
    try:
        got, freed = _run(
            llm,
            [
                ("faulty", a, _params(24, budget=BUDGET, policy="caote-snapkv")),
                ("other", b, _params(24)),
            ],
        )
    finally:
        ev.skip_compaction = None
    assert freed == 0, "blocks were freed for a compaction the worker never did"
    stats = got["faulty"].kv_transfer_params["kv_eviction"]
    assert "recomputed without eviction" in stats["error"], stats
    assert "did not confirm" in stats["error"] or "compacted in 0 of 30" in stats["error"]
    # its stats describe the run that gave its answer: the full cache, nothing evicted
    bs = _core(llm).scheduler.cache_config.block_size
    assert stats["evicted_tokens"] == 0 and stats["eviction_events"] == 0, stats
    assert stats["peak_tokens"] >= len(a) and stats["peak_blocks"] >= math.ceil(len(a) / bs)
    assert _tokens(got["other"]) == _tokens(base["base-b"])
    assert _tokens(got["faulty"]) == _tokens(base["base-a"])  # the full cache's answer
    assert pool.get_num_free_blocks() == free_at_start

    # the engine keeps evicting for everyone after the fault
    assert llm.reset_prefix_cache()
    again, freed = _run(llm, [("after", a, _params(8, budget=BUDGET))])
    assert freed > 0 and "error" not in again["after"].kv_transfer_params["kv_eviction"]


def test_failed_compaction_in_the_last_step_stays_in_the_stats(llm):
    """A planned compaction that fails in the step where the request finishes (adaptive
    prefill evicts at the prompt's end; max_tokens=1 ends it there): nothing to recompute, the
    answer was computed before the compaction, and its stats still say the eviction failed."""
    a, _, _ = _prompts(llm)
    assert llm.reset_prefix_cache()
    ev = _worker_eviction(llm)
    ev.skip_compaction = lambda rid: rid.startswith("last-step")
    try:
        got, freed = _run(llm, [("last-step", a, _params(1, budget=BUDGET))])
    finally:
        ev.skip_compaction = None
    stats = got["last-step"].kv_transfer_params["kv_eviction"]
    assert freed == 0
    assert "last step" in stats.get("error", ""), stats
    assert len(got["last-step"].outputs[0].token_ids) == 1


@pytest.mark.parametrize("policy", ["caote-snapkv", "h2o", "expected-attention"])
def test_a_fallen_back_request_releases_its_worker_state_at_the_fallback(llm, policy):
    """A compaction that fails mid-request (the fault seam, at its second eviction, while it
    decodes): the worker releases the request's state (query ring slot, H2O sums, query
    moments) in the step that failed, not when the request finishes: from the fallback on,
    while it is recomputed without eviction, the worker holds nothing for it, and nothing
    re-creates it."""
    a, _, _ = _prompts(llm)
    assert llm.reset_prefix_cache()
    engine, sched, ev = llm.llm_engine, _core(llm).scheduler, _worker_eviction(llm)
    rid = f"state-{policy}"

    def state() -> bool:  # the worker holds eviction state for the request
        live = (*ev.requests, *ev.rings.slot_of, *ev.rings.recorded)
        return any(r.startswith(rid) for r in live)

    def second_eviction(r: str) -> bool:  # the first, at the prompt's end, goes through
        st = sched.caote.requests.get(r)
        return r.startswith(rid) and st is not None and st.events >= 2

    ev.skip_compaction = second_eviction
    engine.add_request(rid, {"prompt_token_ids": a}, _params(200, budget=BUDGET, policy=policy))
    held, after, outputs = [], [], {}
    try:
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    outputs[o.request_id] = o
            fell_back = any(r.startswith(rid) for r in sched.caote.fallen_back)
            if not outputs:
                (after if fell_back else held).append(state())
    finally:
        ev.skip_compaction = None
    stats = outputs[rid].kv_transfer_params["kv_eviction"]
    assert "recomputed without eviction" in stats["error"], stats
    assert any(held), "the worker never held state for the request: nothing to release"
    assert after and not any(after), after  # released at the fallback, not at the finish


def test_exception_in_scoring_is_contained(llm, monkeypatch):
    """An exception inside scoring (as an unsupported cache dtype raised before) costs that
    request its eviction only: no engine death, the batch's other request is unchanged."""
    from vllm_caote.scoring import KeyDiff

    a, b, _ = _prompts(llm)
    base, _ = _run(llm, [("exc-base-b", b, _params(16))])
    assert llm.reset_prefix_cache()

    def broken(*args, **kwargs):
        raise RuntimeError("scoring exploded")

    monkeypatch.setattr(KeyDiff, "_base", broken)
    got, freed = _run(
        llm, [("exc-a", a, _params(16, budget=BUDGET, policy="keydiff")), ("exc-b", b, _params(16))]
    )
    assert freed == 0
    err = got["exc-a"].kv_transfer_params["kv_eviction"]["error"]
    assert "RuntimeError in layer" in err and "scoring exploded" in err
    assert _tokens(got["exc-b"]) == _tokens(base["exc-base-b"])


def test_prefix_caching_stays_correct_for_unbudgeted_requests(llm):
    """Prefix caching on (vLLM's default): unbudgeted greedy answers are identical before and
    after budgeted requests on the same and on an overlapping prompt; the budgeted ones evict;
    unbudgeted repeats still hit the prefix cache; the pool's free count returns."""
    sched = _core(llm).scheduler
    assert sched.kv_cache_manager.enable_caching, "the plugin must not turn prefix caching off"
    a, _, overlap = _prompts(llm)
    pool = sched.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    before, _ = _run(llm, [("pc-a0", a, _params(24)), ("pc-o0", overlap, _params(24))])
    # Empty the cache, so that any block a budgeted request registered would be what the
    # unbudgeted repeats below hit.
    assert llm.reset_prefix_cache()
    budgeted, freed = _run(
        llm,
        [
            ("pc-a1", a, _params(24, budget=BUDGET, policy="caote-snapkv")),
            ("pc-o1", overlap, _params(24, budget=BUDGET, policy="h2o")),
        ],
    )
    after, _ = _run(llm, [("pc-a2", a, _params(24))])
    after.update(_run(llm, [("pc-o2", overlap, _params(24))])[0])
    for rid in ("pc-a1", "pc-o1"):
        stats = budgeted[rid].kv_transfer_params["kv_eviction"]
        assert stats["evicted_tokens"] > 0 and "error" not in stats
    assert freed > 0
    assert _tokens(after["pc-a2"]) == _tokens(before["pc-a0"])
    assert _tokens(after["pc-o2"]) == _tokens(before["pc-o0"])
    # the overlapping prompt hits the 5 full blocks of a's prefix that pc-a2 cached
    assert after["pc-o2"].num_cached_tokens >= 640, "unbudgeted requests lost prefix caching"
    assert pool.get_num_free_blocks() == free_at_start


def test_budgeted_request_reuses_a_cached_prefix_without_writing_it(llm):
    """A budgeted request whose prompt starts with a cached prefix (a shared document) reads it
    from the prefix cache, evicts only among its own tokens, and never writes the shared
    blocks: the unbudgeted request that cached them answers the same afterwards."""
    from benchmarks.tasks import filler_prompt_ids

    tok = llm.get_tokenizer()
    bs = _core(llm).scheduler.cache_config.block_size
    prefix = filler_prompt_ids(tok, 16 * bs, 100000)  # 16 whole blocks
    q0 = prefix + filler_prompt_ids(tok, 300, 110000)
    q1 = prefix + filler_prompt_ids(tok, 500, 120000)
    assert llm.reset_prefix_cache()
    first, _ = _run(llm, [("share-0", q0, _params(24))])
    warm, freed = _run(llm, [("share-1", q1, _params(24, budget=BUDGET, policy="caote-snapkv"))])
    again, _ = _run(llm, [("share-0b", q0, _params(24))])
    assert llm.reset_prefix_cache()
    cold, _ = _run(llm, [("share-1c", q1, _params(24, budget=BUDGET, policy="caote-snapkv"))])

    hits = warm["share-1"].num_cached_tokens
    stats = warm["share-1"].kv_transfer_params["kv_eviction"]
    assert hits >= 15 * bs, hits  # most of the shared prefix came from the cache
    assert stats["prefix_cached_tokens"] == hits and stats["evicted_tokens"] > 0, stats
    assert freed > 0 and "error" not in stats
    # the budget bounds what it holds alone; the shared blocks come on top
    assert stats["peak_blocks"] <= hits // bs + math.ceil((BUDGET + 512) / bs) + 1, stats
    assert _tokens(again["share-0b"]) == _tokens(first["share-0"]), "shared blocks were written"
    cold_stats = cold["share-1c"].kv_transfer_params["kv_eviction"]
    assert cold["share-1c"].num_cached_tokens == 0 and cold_stats["prefix_cached_tokens"] == 0
    print(
        "warm (prefix kept whole) vs cold (whole prompt evicted to the budget) answers equal:",
        _tokens(warm["share-1"]) == _tokens(cold["share-1c"]),
    )


def test_session_update_keeps_eviction_state(llm):
    """A streaming-input session update re-enters add_request with the same request id: the
    budget state (evicted count over an already compacted cache) must survive it."""
    from vllm.v1.request import Request

    a, _, _ = _prompts(llm)
    engine = llm.llm_engine
    sched = _core(llm).scheduler
    assert llm.reset_prefix_cache()
    engine.add_request("session", {"prompt_token_ids": a}, _params(40, budget=BUDGET))
    for _ in range(4):
        engine.step()
    (rid,) = [r for r in sched.caote.requests if r.startswith("session")]
    state = sched.caote.requests[rid]
    evicted = state.evicted
    assert evicted > 0
    update = Request(
        request_id=rid,
        prompt_token_ids=a[:8],
        sampling_params=sched.requests[rid].sampling_params,
        pooling_params=None,
    )
    sched.caote.add(update)  # what CaoteScheduler.add_request does for any request
    assert sched.caote.requests[rid] is state and state.evicted == evicted
    while engine.has_unfinished_requests():
        engine.step()


def _session_turn(llm, rid: str, ids: list[int], params, resumable: bool = True) -> str:
    """One input of a streaming-input (resumable) session, as ``AsyncLLM`` sends it (vLLM 0.32
    exposes input streaming only there): the first names the session, later ones reuse the
    engine's id. Returns the engine's request id."""
    engine = llm.llm_engine
    req = engine.input_processor.process_inputs(
        rid, {"prompt_token_ids": list(ids)}, params,
        supported_tasks=engine.get_supported_tasks(), resumable=resumable,
    )  # fmt: skip
    if rid in _core(llm).scheduler.requests:
        req.external_req_id = rid.rsplit("-", 1)[0]
    else:
        engine.input_processor.assign_request_id(req)
    engine.output_processor.add_request(req, None, None, 0)
    # in-process, the engine core would share the token list the output processor extends
    core_req = copy.copy(req)
    core_req.prompt_token_ids = list(req.prompt_token_ids)
    engine.engine_core.add_request(core_req)
    return req.request_id


def _step_until(llm, rid: str, status) -> None:
    sched = _core(llm).scheduler
    for _ in range(200):
        if sched.requests[rid].status == status:
            return
        llm.llm_engine.step()
    r = sched.requests[rid]
    raise AssertionError(f"{rid} never reached {status}: {r.status} {r.num_computed_tokens}")


def test_failed_compaction_of_a_session_between_turns_restarts_it(llm):
    """A streaming-input session whose turn ends in the step whose compaction fails half-way
    (15 of 30 layers compacted) is alive but not running: its blocks are freed at once, none
    reaches the prefix cache, and its next turn is recomputed from token 0, answering as an
    unbudgeted request on the same tokens does."""
    from vllm.v1.request import RequestStatus

    from benchmarks.tasks import filler_prompt_ids

    sched = _core(llm).scheduler
    pool = sched.kv_cache_manager.block_pool
    a, _, _ = _prompts(llm)
    more = filler_prompt_ids(llm.get_tokenizer(), 200, 130000)
    assert llm.reset_prefix_cache()
    base, _ = _run(llm, [("stream-base", a + more, _params(8))])
    assert llm.reset_prefix_cache()  # so a block the session registered is what a hit reads
    free_at_start = pool.get_num_free_blocks()

    layers = []  # one entry per layer that reached the session's planned compaction

    def half_way(req_id: str) -> bool:  # the worker compacts 15 layers, then skips the rest
        if not req_id.startswith("stream"):
            return False
        layers.append(req_id)
        return len(layers) > 15

    ev = _worker_eviction(llm)
    ev.skip_compaction = half_way
    try:
        rid = _session_turn(llm, "stream", a, _params(1, budget=BUDGET))
        _step_until(llm, rid, RequestStatus.WAITING_FOR_STREAMING_REQ)
    finally:
        ev.skip_compaction = None
    assert len(layers) == 30, "the compaction was not planned in the turn's last step"
    assert rid in sched.caote.fallen_back and rid not in sched.caote.requests
    assert sched.caote.kv.num_held_blocks(rid) == 0, "a half-compacted cache stayed alive"

    _session_turn(llm, rid, more, _params(8, budget=BUDGET))
    assert sched.requests[rid].num_computed_tokens == 0, "not recomputed from token 0"
    _step_until(llm, rid, RequestStatus.WAITING_FOR_STREAMING_REQ)
    turn = sched.requests[rid]
    assert turn.num_prompt_tokens == len(a) + len(more)
    assert list(turn.output_token_ids) == _tokens(base["stream-base"])
    _session_turn(llm, rid, [0], _params(1), resumable=False)  # the session ends
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()

    # the prefix cache holds no block of the half-compacted cache: an unbudgeted repeat reads
    # the session's second (unbudgeted, recomputed) turn and answers as before
    again, _ = _run(llm, [("stream-again", a + more, _params(8))])
    assert again["stream-again"].num_cached_tokens > 0
    assert _tokens(again["stream-again"]) == _tokens(base["stream-base"])
    assert llm.reset_prefix_cache() and pool.get_num_free_blocks() == free_at_start


def test_h2o_counts_every_query_exactly_once():
    """H2O's running sum advanced per step equals the brute-force sum of every query's causal
    attention, whatever the step sizes (a prefill chunk, then single decode tokens)."""
    from vllm_caote.scoring import attention_weights, get_policy, pool_tokens

    torch.manual_seed(0)
    hkv, g, d, n = 3, 3, 16, 40
    q = torch.randn(hkv * g, n, d, dtype=torch.float64)
    k = torch.randn(hkv, n, d, dtype=torch.float64)
    policy = get_policy("h2o")
    state, seen = None, 0
    for step in (17, 1, 1, 8, 1, 12):
        state = policy.advance(q[:, seen : seen + step], k[:, : seen + step], state)
        seen += step
    brute = attention_weights(q, k, causal=True).sum(dim=(1, 2))  # every query once
    torch.testing.assert_close(state, brute)
    assert torch.equal(policy.score_from_state(k, state, pool_neighbours=False), state)
    torch.testing.assert_close(policy.score_from_state(k, state), pool_tokens(state))


# -- fp8 KV cache through the real server -----------------------------------------------------


@pytest.fixture(scope="module")
def fp8_server(tmp_path_factory):
    from helpers.servers import own_server

    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        # hardware, not a package setup could install: vLLM-CPU itself refuses fp8 KV here
        # ("FP8 KV cache on CPU requires x86 with AVX-512 or AMX"), so it is a skip, in CI too
        pytest.skip("this CPU has neither AVX-512 nor AMX, which vLLM-CPU's fp8 KV cache needs")
    with own_server(tmp_path_factory.mktemp("fp8"), "--max-model-len", "4096",
                    "--kv-cache-dtype", "fp8", kv_space_gib="1") as server:  # fmt: skip
        yield server


@pytest.mark.server
def test_fp8_kv_cache_budgeted_request_evicts_and_server_keeps_serving(fp8_server):
    import requests
    from transformers import AutoTokenizer

    from benchmarks.tasks import filler_prompt_ids
    from vllm_caote.models import model_dir

    tok = AutoTokenizer.from_pretrained(model_dir())
    prompt, other = filler_prompt_ids(tok, 1000, 0), filler_prompt_ids(tok, 1000, 5000)
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 12, "temperature": 0}

    def ask(**extra):
        r = requests.post(fp8_server.url("/v1/completions"), json={**body, **extra}, timeout=300)
        return r.status_code, r.json()

    code, before = ask()
    assert code == 200, before
    # its own prompt: a prefix-cache hit on `prompt` would leave too little to evict
    code, budgeted = ask(prompt=other, kv_budget=BUDGET)
    assert code == 200, budgeted
    stats = budgeted["kv_eviction"]
    assert stats["evicted_tokens"] > 0 and "error" not in stats, stats
    code, after = ask()
    assert code == 200 and after["choices"][0]["text"] == before["choices"][0]["text"]
    assert requests.get(fp8_server.url("/health"), timeout=10).status_code == 200
    assert "EngineCore encountered" not in fp8_server.log_text()
    print("fp8 budgeted answer:", json.dumps(budgeted["choices"][0]["text"]))
