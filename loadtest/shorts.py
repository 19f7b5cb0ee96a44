"""Short requests beside long ones at capacity: what a budget costs the traffic that did not ask.

Part of the capacity benchmark (``python -m loadtest.quality --shorts N``).
The long retrieval prompts of a quality cell are sent at once into the small pool; ``delay``
seconds later (the pool full, long prompts queued), ``N`` short unbudgeted requests arrive.
Two scenarios, in the same run: the long prompts unbudgeted (stock vLLM's first-come,
first-served) and budgeted (the first policy at the first fraction). Per scenario: the short
requests' end-to-end latency and time to first token (p50/p90), the long prompts' accuracy and
latency, vLLM's preemptions. Under the ``adaptive`` prefill a budgeted prompt may wait for room
by choice (for budgeted prompts ahead of it to shrink); while it does, it steps aside for
requests that fit now, so short requests do not wait behind it.
"""

from __future__ import annotations

import asyncio
import time

SHORT_OUTPUT_TOKENS = 16


def short_prompts(n: int) -> list[str]:
    """``n`` distinct short prompts (~20 tokens): each its own, so no prefix-cache effects."""
    return [
        f"Question {i}: what is {i + 3} plus {2 * i + 5}? Answer in one word:" for i in range(n)
    ]


async def scenario(url, model, cases, budget, policy, n_shorts, delay, args) -> dict:
    """Long prompts (``budget`` or none) at once, ``n_shorts`` unbudgeted ones ``delay`` later."""
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import (
        RequestFuncInput,
        async_request_openai_completions,
    )

    from loadtest import pct
    from loadtest.quality import _scrape

    def request(prompt, output_len, extra, session):
        inp = RequestFuncInput(prompt=prompt, api_url=url + "/v1/completions", prompt_len=0,
                               output_len=output_len, model=model, extra_body=extra)  # fmt: skip
        return asyncio.create_task(async_request_openai_completions(inp, session))

    long_body = {"temperature": 0.0, "kv_budget": budget or 0}
    if budget:
        long_body["kv_policy"] = policy
    _, _, preempt0 = await asyncio.to_thread(_scrape, url)
    timeout = aiohttp.ClientTimeout(total=args.cell_seconds)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        longs = [request(c.prompt, 12, long_body, session) for c in cases]
        await asyncio.sleep(delay)
        _, waiting_at_arrival, _ = await asyncio.to_thread(_scrape, url)
        body = {"temperature": 0.0, "kv_budget": 0}
        shorts = [request(p, SHORT_OUTPUT_TOKENS, body, session) for p in short_prompts(n_shorts)]
        long_outs = await asyncio.gather(*longs)
        short_outs = await asyncio.gather(*shorts)
        wall = time.perf_counter() - t0
    for _ in range(240):  # drain before the next cell
        run, wait, preempt1 = await asyncio.to_thread(_scrape, url)
        if run == 0 and wait == 0:
            break
        await asyncio.sleep(0.5)
    ok_shorts = [o for o in short_outs if o.success]
    latency = [o.latency for o in ok_shorts]
    ttft = [o.ttft for o in ok_shorts]
    long_latency = [o.latency + 0.0 for o in long_outs if o.success]
    correct = sum(bool(o.success and c.answer in (o.generated_text or ""))
                  for c, o in zip(cases, long_outs, strict=True))  # fmt: skip
    return dict(
        longs="budgeted" if budget else "unbudgeted",
        budget=budget,
        policy=policy if budget else None,
        shorts=n_shorts,
        delay_s=delay,
        waiting_when_shorts_arrived=waiting_at_arrival,
        short_latency_p50_s=pct(latency, 50),
        short_latency_p90_s=pct(latency, 90),
        short_ttft_p50_s=pct(ttft, 50),
        short_ttft_p90_s=pct(ttft, 90),
        long_latency_p50_s=pct(long_latency, 50),
        long_correct=correct,
        long_n=len(cases),
        errors=sum(not o.success for o in (*long_outs, *short_outs)),
        preemptions=preempt1 - preempt0,
        wall_s=wall,
    )


async def run_scenarios(url, model, cases, budget, policy, args) -> list[dict]:
    """Both scenarios, stock first; ratios of the budgeted one against it."""
    out = []
    for b in (None, budget):
        out.append(await scenario(url, model, cases, b, policy, args.shorts, args.shorts_delay,
                                  args))  # fmt: skip
        s = out[-1]
        print(f"  shorts beside {s['longs']} long prompts: p50 {s['short_latency_p50_s'] or 0:.1f}"
              f" s, p90 {s['short_latency_p90_s'] or 0:.1f} s", flush=True)  # fmt: skip
    stock = out[0]
    for s in out:
        for key in ("short_latency_p50_s", "short_latency_p90_s"):
            s[key.replace("_s", "_ratio")] = (s[key] or 0) / max(stock[key] or 0, 1e-9)
    return out


def render_md(scenarios: list[dict]) -> list[str]:
    if not scenarios:
        return []
    s0 = scenarios[0]
    lines = [
        "## Short requests beside long prompts",
        "",
        f"{s0['long_n']} long prompts at once, then {s0['shorts']} short unbudgeted requests "
        f"({SHORT_OUTPUT_TOKENS} output tokens) {s0['delay_s']:.0f} s later, into the same full "
        "pool. A budgeted prompt waiting for room by choice steps aside for requests that fit.",
        "",
        "| long prompts | budget | waiting when shorts came | shorts latency p50 / p90 (s) "
        "| vs unbudgeted | shorts TTFT p50 / p90 (s) | longs correct | longs latency p50 (s) "
        "| preemptions | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in scenarios:
        lines.append(
            f"| {s['longs']} | {s['budget'] or '-'} | {s['waiting_when_shorts_arrived']:.0f} | "
            f"{s['short_latency_p50_s'] or 0:.1f} / {s['short_latency_p90_s'] or 0:.1f} | "
            f"{s['short_latency_p50_ratio']:.2f}x / {s['short_latency_p90_ratio']:.2f}x | "
            f"{s['short_ttft_p50_s'] or 0:.1f} / {s['short_ttft_p90_s'] or 0:.1f} | "
            f"{s['long_correct']}/{s['long_n']} | {s['long_latency_p50_s'] or 0:.1f} | "
            f"{s['preemptions']:.0f} | {s['errors']} |"
        )
    return lines + [""]
