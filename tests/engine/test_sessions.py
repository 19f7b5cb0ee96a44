"""Conversations under a budget (issue 31): the next turn resumes from the compacted cache.

One in-process engine with a 40-block pool (128-token blocks on vLLM-CPU). Turn 1 is a
budgeted request; turn 2's prompt is turn 1's prompt, turn 1's output and new text. Turn 2
takes the kept compacted cache: it starts with turn 1's tokens computed and prefills only its
new ones; a policy with worker state (H2O, Expected Attention) resumes that state too. Edited
histories, unbudgeted requests and other policies never see the kept blocks;
two continuations of one history: one resumes, the other recomputes; under memory pressure
vLLM reclaims the kept blocks like any cached free block, without preempting anyone.
"""

from __future__ import annotations

import pytest
import torch
from helpers import engine_scheduler as _sched
from helpers import essay_ids as _ids

from vllm_caote.engine.kept_state import MAX_STATE_BYTES

pytestmark = pytest.mark.engine

POOL_BLOCKS = 40
BUDGET = 256
OUT = 16  # turn 1's output tokens


@pytest.fixture(scope="module")
def llm():
    from benchmarks.eval.common import close_llm, make_llm

    engine = make_llm(None, max_model_len=4096, num_gpu_blocks_override=POOL_BLOCKS)
    yield engine
    close_llm(engine)


def _generate(llm, requests) -> tuple[dict, int]:
    """``(id, prompt ids, budget, max_tokens[, policy])`` added at once, stepped to completion:
    ``({id: RequestOutput}, most preemptions of any request)``."""
    from benchmarks.eval.common import sampling

    engine, sched = llm.llm_engine, _sched(llm)
    for rid, ids, budget, max_tokens, *policy in requests:
        params = sampling(max_tokens, budget=budget, policy=(policy or [None])[0], ignore_eos=True)
        engine.add_request(rid, {"prompt_token_ids": ids}, params)
    outputs, preempted = {}, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o
        preempted = max([preempted] + [r.num_preemptions for r in sched.requests.values()])
    return outputs, preempted


def _stats(output) -> dict:
    return (output.kv_transfer_params or {}).get("kv_eviction") or {}


def _turn1(llm, rid: str, offset: int, n: int = 1500, policy=None):
    """A budgeted first turn; returns ``(its prompt + output, T = tokens whose KV it kept)``."""
    prompt = _ids(llm, n, offset)
    req = (rid, prompt, BUDGET, OUT) + ((policy,) if policy else ())
    out, _ = _generate(llm, [req])
    history = prompt + list(out[rid].outputs[0].token_ids)
    assert len(history) == n + OUT
    return history, len(history) - 1


def test_next_turn_resumes_from_the_compacted_cache(llm):
    sched = _sched(llm)
    assert llm.reset_prefix_cache()
    history, T = _turn1(llm, "t1", 0)
    assert sched.caote.sessions.num_blocks() > 0
    new = _ids(llm, 200, 30000)
    out, preempted = _generate(llm, [("t2", history + new, BUDGET, OUT)])
    st = _stats(out["t2"])
    assert st["resumed_tokens"] == T, st
    assert out["t2"].num_cached_tokens == T  # vLLM computed only the new tokens
    assert st["eviction_events"] >= 1 and len(out["t2"].outputs[0].token_ids) == OUT
    # its cache never held more than the kept cache plus the new tokens
    assert st["own_peak_tokens"] <= BUDGET + sched.caote.slack + len(new) + 1, st
    assert sched.caote.sessions.num_blocks() > 0  # turn 2 is kept in its turn
    assert preempted == 0
    # the same prompt read whole at the same budget (the kept cache was taken: recomputed)
    ref, _ = _generate(llm, [("t2-reread", history + new, BUDGET, OUT)])
    assert _stats(ref["t2-reread"])["resumed_tokens"] == 0
    a = list(out["t2"].outputs[0].token_ids)
    b = list(ref["t2-reread"].outputs[0].token_ids)
    agree = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
    print(f"resumed vs re-read greedy answers agree on the first {agree}/{len(a)} tokens")


def test_edited_history_unbudgeted_and_other_policy_never_match(llm):
    sched = _sched(llm)
    assert llm.reset_prefix_cache()
    history, T = _turn1(llm, "e1", 2000, n=800)
    new = _ids(llm, 150, 31000)
    edited = list(history)
    edited[300] = edited[301]  # one token changed, far before the end
    unchanged = history + new
    out, _ = _generate(
        llm,
        [
            ("e2-edited", edited + new, BUDGET, OUT),
            ("e2-unbudgeted", unchanged, None, OUT),
            ("e2-other-policy", unchanged, BUDGET, OUT, "keydiff"),
        ],
    )
    assert _stats(out["e2-edited"])["resumed_tokens"] == 0
    assert _stats(out["e2-other-policy"])["resumed_tokens"] == 0
    assert _stats(out["e2-unbudgeted"]) == {}
    assert out["e2-unbudgeted"].num_cached_tokens == 0  # no block of the kept cache
    # none of them took it: it is still kept for the real continuation
    assert any(k.length == T for k in sched.caote.sessions.kept.values())


def test_two_continuations_one_resumes_the_other_recomputes(llm):
    assert llm.reset_prefix_cache()
    history, T = _turn1(llm, "b1", 4000)
    a = history + _ids(llm, 120, 32000)
    b = history + _ids(llm, 180, 33000)
    out, preempted = _generate(llm, [("b2-a", a, BUDGET, OUT), ("b2-b", b, BUDGET, OUT)])
    resumed = sorted(_stats(out[r])["resumed_tokens"] for r in ("b2-a", "b2-b"))
    assert resumed == [0, T]
    for rid in ("b2-a", "b2-b"):
        assert len(out[rid].outputs[0].token_ids) == OUT
    assert preempted == 0


def _worker(llm):
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


def _session(llm, rid: str, inputs: list[tuple[list[int], int]], policy: str) -> list[list]:
    """A budgeted streaming-input session (one request, its worker state carried between
    inputs by construction), as ``AsyncLLM`` feeds it: ``(new prompt ids, max_tokens)`` per
    input. Returns each input's output tokens."""
    import copy

    from vllm.v1.request import RequestStatus

    from benchmarks.eval.common import sampling

    engine, sched = llm.llm_engine, _sched(llm)
    outs, rid_core = [], None
    for i, (ids, max_tokens) in enumerate([*inputs, ([0], 1)]):
        last = i == len(inputs)
        params = sampling(max_tokens, budget=BUDGET, policy=policy, ignore_eos=True)
        req = engine.input_processor.process_inputs(
            rid_core or rid, {"prompt_token_ids": list(ids)}, params,
            supported_tasks=engine.get_supported_tasks(), resumable=not last,
        )  # fmt: skip
        if rid_core is None:
            engine.input_processor.assign_request_id(req)
            rid_core = req.request_id
        else:
            req.external_req_id = rid
        engine.output_processor.add_request(req, None, None, 0)
        core_req = copy.copy(req)
        core_req.prompt_token_ids = list(req.prompt_token_ids)
        engine.engine_core.add_request(core_req)
        if last:
            break
        for _ in range(400):
            r = sched.requests[rid_core]
            if r.status == RequestStatus.WAITING_FOR_STREAMING_REQ:
                break
            engine.step()
        outs.append(list(sched.requests[rid_core].output_token_ids))
    while engine.has_unfinished_requests():
        engine.step()
    return outs


def _selections(rid_prefix: str, after: int, upto: int, into: list):
    """An observer of the eviction selections of requests ``rid_prefix*`` with ``after`` to
    ``upto`` true tokens: ``(layer, total, cache_len, keep_idx)`` appended to ``into``."""

    def observe(sel) -> None:
        if sel.req_id.startswith(rid_prefix) and after < sel.total <= upto:
            into.append((sel.layer, sel.total, sel.cache_len, sel.keep_idx.cpu()))

    return observe


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x[:3] == y[:3] and torch.equal(x[3], y[3]) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("policy", ["h2o", "expected-attention"])
def test_stateful_turn_resumes_with_its_worker_state(llm, policy):
    """H2O's sums / Expected Attention's query moments are kept with the compacted cache, and
    the next turn's worker state starts from them: the resumed turn evicts and answers exactly
    as the same conversation fed to one request as a streaming-input session (whose worker
    state is carried by construction). A worker that lost the state (its byte cap) resumes on
    the policy's fresh state, says so, and evicts otherwise."""
    from vllm_caote.engine import observe

    sched, ev = _sched(llm), _worker(llm).caote
    prompt, new = _ids(llm, 900, 40000), _ids(llm, 150, 41000)
    T = len(prompt) + OUT - 1  # tokens whose KV turn 1 cached (all but its last output)
    end = T + len(new) + OUT - 1  # the same for turn 2

    assert llm.reset_prefix_cache()
    ref_sel: list = []
    with observe.selections(_selections("sess", T, end, ref_sel)):
        ref1, ref2 = _session(llm, "sess", [(prompt, OUT), (new, OUT)], policy)
    assert len(ref1) == len(ref2) == OUT and ref_sel, "turn 2 of the session never evicted"

    # turn 1 alone: its cache and its worker state are kept
    assert llm.reset_prefix_cache()
    out, _ = _generate(llm, [("k1", prompt, BUDGET, OUT, policy)])
    out1 = list(out["k1"].outputs[0].token_ids)
    assert out1 == ref1
    (kept,) = [k for k in sched.caote.sessions.kept.values() if k.length == T]
    assert kept.state is not None
    _generate(llm, [("probe", _ids(llm, 20, 42000), None, 1)])  # ships the finish to the worker
    st, _size = ev.kept.store[kept.state]
    assert (st.tokens, st.cache) == (T, kept.cached)
    assert len(st.layers) == ev.num_kv_layers
    for ls in st.layers.values():  # the state lines up with the compacted cache's slots
        if policy == "h2o":
            assert ls.h2o.shape[-1] == kept.cached
        else:
            assert ls.moments.count > 0

    # turn 2 resumes it: the session's evictions and answer
    sel: list = []
    turn2 = prompt + out1[:-1] + new  # what the session's second input makes its prompt
    with observe.selections(_selections("k2", T, end, sel)):
        out, preempted = _generate(llm, [("k2", turn2, BUDGET, OUT, policy)])
    stats = _stats(out["k2"])
    assert stats["resumed_tokens"] == T and stats["resumed_state"] == "kept", stats
    assert kept.state not in ev.kept.store  # taken by the resuming request
    assert list(out["k2"].outputs[0].token_ids) == ref2
    assert _same(sel, ref_sel), "the resumed turn evicted otherwise than the session"
    assert preempted == 0

    # the worker cannot hold the state: the resume starts from the fresh state, and says so
    assert llm.reset_prefix_cache()
    ev.kept.max_bytes = 0
    try:
        _generate(llm, [("n1", prompt, BUDGET, OUT, policy)])
        sel = []
        with observe.selections(_selections("n2", T, end, sel)):
            out, _ = _generate(llm, [("n2", turn2, BUDGET, OUT, policy)])
    finally:
        ev.kept.max_bytes = MAX_STATE_BYTES
    stats = _stats(out["n2"])
    assert stats["resumed_tokens"] == T and stats["resumed_state"] == "rebuilt", stats
    assert len(out["n2"].outputs[0].token_ids) == OUT and "error" not in stats
    assert sel and not _same(sel, ref_sel), "a fresh state evicted as the kept one did"


def test_kept_states_are_bounded(llm, monkeypatch):
    """Past ``MAX_KEPT_STATES`` the oldest kept cache with worker state is dropped with its
    state: its next turn recomputes, the worker's store never outgrows the bound."""
    from vllm_caote.engine import sessions

    monkeypatch.setattr(sessions, "MAX_KEPT_STATES", 1)
    sched, ev = _sched(llm), _worker(llm).caote
    assert llm.reset_prefix_cache()
    h_a, _ = _turn1(llm, "m1", 6000, n=600, policy="h2o")
    h_b, T_b = _turn1(llm, "m2", 7000, n=600, policy="h2o")
    assert len(sched.caote.sessions.states) == 1
    out, _ = _generate(
        llm,
        [
            ("m1-2", h_a + _ids(llm, 100, 34000), BUDGET, OUT, "h2o"),
            ("m2-2", h_b + _ids(llm, 100, 34500), BUDGET, OUT, "h2o"),
        ],
    )
    assert len(ev.kept.store) <= 1
    assert _stats(out["m1-2"])["resumed_tokens"] == 0  # dropped with its state: recomputed
    assert _stats(out["m2-2"])["resumed_tokens"] == T_b
    assert _stats(out["m2-2"])["resumed_state"] == "kept"


def test_kept_blocks_are_reclaimed_under_pressure_without_preemption(llm):
    """Kept caches are cached free blocks: vLLM takes them when it needs room (least recently
    used first), never preempting a request for them; the turn after that recomputes."""
    sched = _sched(llm)
    assert llm.reset_prefix_cache()
    history, T = _turn1(llm, "p1", 8000)
    kept = sched.caote.sessions.num_blocks()
    pool = sched.kv_cache_manager.block_pool
    assert kept > 0 and pool.get_num_free_blocks() == POOL_BLOCKS - 1  # kept blocks count free
    # two unbudgeted prompts needing more blocks than the pool has outside the kept cache
    out, preempted = _generate(
        llm,
        [("p-hog", _ids(llm, 4000, 12000), None, 4), ("p-hog2", _ids(llm, 700, 17000), None, 4)],
    )
    assert preempted == 0
    # the index is checked against the pool: the reclaimed cache no longer counts
    assert sched.caote.sessions.num_blocks() < kept
    out, _ = _generate(llm, [("p2", history + _ids(llm, 100, 35000), BUDGET, OUT)])
    assert _stats(out["p2"])["resumed_tokens"] == 0  # reclaimed: recomputed
    assert len(out["p2"].outputs[0].token_ids) == OUT


def test_resume_after_a_shared_prefix(llm):
    """Turn 1 read a document from vLLM's prefix cache (shared, protected blocks): turn 2 gets
    those blocks again by their true hashes, then the kept compacted blocks, and keeps the
    document protected."""
    sched = _sched(llm)
    bs = sched.cache_config.block_size
    assert llm.reset_prefix_cache()
    doc = _ids(llm, 5 * bs, 20000)
    _generate(llm, [("s-doc", doc + _ids(llm, 50, 26000), None, 2)])  # caches the document
    prompt = doc + _ids(llm, 700, 27000)
    out, _ = _generate(llm, [("s1", prompt, BUDGET, OUT)])
    assert _stats(out["s1"])["shared_prefix_tokens"] == 5 * bs
    history = prompt + list(out["s1"].outputs[0].token_ids)
    out, preempted = _generate(llm, [("s2", history + _ids(llm, 100, 28000), BUDGET, OUT)])
    st = _stats(out["s2"])
    assert st["resumed_tokens"] == len(history) - 1, st
    assert st["shared_prefix_tokens"] == 5 * bs, st
    assert out["s2"].num_cached_tokens == len(history) - 1
    assert len(out["s2"].outputs[0].token_ids) == OUT and preempted == 0


def test_a_prefix_cache_reset_drops_the_kept_caches(llm):
    """A reset unregisters every cached block, kept caches included: the index (and the
    kept_session_blocks gauge) forgets them, and the next turn recomputes."""
    sched = _sched(llm)
    assert llm.reset_prefix_cache()
    history, T = _turn1(llm, "r1", 9000, n=800)
    assert sched.caote.sessions.num_blocks() > 0
    assert llm.reset_prefix_cache()
    assert sched.caote.sessions.num_blocks() == 0 and not sched.caote.sessions.kept
    out, _ = _generate(llm, [("r2", history + _ids(llm, 100, 36000), BUDGET, OUT)])
    assert _stats(out["r2"])["resumed_tokens"] == 0
    assert len(out["r2"].outputs[0].token_ids) == OUT
