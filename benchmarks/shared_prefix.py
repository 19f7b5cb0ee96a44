"""``make bench``'s shared-system-prompt workload: budgeted requests that share a long prefix,
with prefix caching on (they read the cached prefix) vs off (``skip_reading_prefix_cache``).

Every request is ``prefix + its own question`` with a ``kv_budget``. Before each phase the
prefix cache is emptied and one unbudgeted request with the prefix warms it (as the first user
of a system prompt would); then all budgeted requests arrive at once and the engine is stepped
to completion. Reported per phase: wall time, requests/s and output tokens/s, time to first
token (from arrival to the first generated token, p50 and max), prefix-cache hit tokens and
preemptions; and the ratios on / off.
"""

from __future__ import annotations

import statistics
import time


def _phase(llm, prompts, warm, budget: int, policy: str, max_tokens: int, skip: bool) -> dict:
    from vllm import SamplingParams

    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    assert llm.reset_prefix_cache()
    llm.generate([{"prompt_token_ids": warm}], SamplingParams(max_tokens=1), use_tqdm=False)
    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        ignore_eos=True,
        skip_reading_prefix_cache=skip,
        extra_args={"kv_budget": budget, "kv_policy": policy},
    )
    start = time.perf_counter()
    ids = [f"shared-{int(skip)}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, {"prompt_token_ids": p}, params)
    first: dict[str, float] = {}
    done = {}
    preempted = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter() - start
        preempted = max([preempted, *(r.num_preemptions for r in sched.requests.values())])
        for o in outs:
            if o.outputs and o.outputs[0].token_ids:
                first.setdefault(o.request_id, now)
            if o.finished:
                done[o.request_id] = o
    wall = time.perf_counter() - start
    ttft = [first[r] for r in ids]
    stats = [done[r].kv_transfer_params["kv_eviction"] for r in ids]
    return dict(
        wall_s=wall,
        requests_per_s=len(ids) / wall,
        output_tokens_per_s=len(ids) * max_tokens / wall,
        ttft_p50_s=statistics.median(ttft),
        ttft_max_s=max(ttft),
        prefix_hit_tokens=sum(done[r].num_cached_tokens or 0 for r in ids),
        evicted_tokens=sum(s["evicted_tokens"] for s in stats),
        peak_blocks_max=max(s["peak_blocks"] for s in stats),
        preemptions=preempted,
    )


def shared_prefix(llm, policy: str, requests: int = 6, prefix_tokens: int = 2048,
                  question_tokens: int = 256, budget: int = 512, max_tokens: int = 16) -> dict:  # fmt: skip
    """Both phases on the same engine; the result dict ``make bench`` stores and renders."""
    from benchmarks.tasks import filler_prompt_ids

    tok = llm.get_tokenizer()
    prefix = filler_prompt_ids(tok, prefix_tokens, 60000)
    prompts = [
        prefix + filler_prompt_ids(tok, question_tokens, 90000 + 1000 * i) for i in range(requests)
    ]
    warm = prefix + filler_prompt_ids(tok, question_tokens, 120000)
    on = _phase(llm, prompts, warm, budget, policy, max_tokens, skip=False)
    off = _phase(llm, prompts, warm, budget, policy, max_tokens, skip=True)
    return dict(
        config=dict(
            requests=requests,
            prefix_tokens=prefix_tokens,
            question_tokens=question_tokens,
            budget=budget,
            policy=policy,
            max_tokens=max_tokens,
        ),
        prefix_caching=on,
        no_prefix_caching=off,
        throughput_ratio=on["requests_per_s"] / off["requests_per_s"],
        ttft_p50_ratio=on["ttft_p50_s"] / off["ttft_p50_s"],
    )


def render_md(r: dict) -> list[str]:
    c, on, off = r["config"], r["prefix_caching"], r["no_prefix_caching"]
    rows = [
        ("requests/s", "requests_per_s", "{:.3f}"),
        ("output tokens/s", "output_tokens_per_s", "{:.2f}"),
        ("TTFT p50 (s)", "ttft_p50_s", "{:.1f}"),
        ("TTFT max (s)", "ttft_max_s", "{:.1f}"),
        ("prefix-cache hit tokens", "prefix_hit_tokens", "{:d}"),
        ("tokens evicted", "evicted_tokens", "{:d}"),
        ("peak blocks of one request", "peak_blocks_max", "{:d}"),
        ("preemptions", "preemptions", "{:d}"),
    ]
    lines = [
        "## Shared system prompt, budgeted requests: prefix caching on vs off",
        "",
        f"{c['requests']} budgeted requests (kv_budget {c['budget']}, {c['policy']}) at once, "
        f"each a shared {c['prefix_tokens']}-token prefix + its own {c['question_tokens']}-token "
        f"question, {c['max_tokens']} output tokens; the cache warmed by one unbudgeted request "
        "with the prefix. Off = `skip_reading_prefix_cache` on every budgeted request.",
        "",
        "| | prefix caching on | off | on / off |",
        "| --- | --- | --- | --- |",
    ]
    for label, key, fmt in rows:
        ratio = f"{on[key] / off[key]:.2f}x" if off[key] else ""
        lines.append(f"| {label} | {fmt.format(on[key])} | {fmt.format(off[key])} | {ratio} |")
    return lines + [""]
