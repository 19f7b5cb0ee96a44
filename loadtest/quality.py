"""Quality at capacity, as one joint measurement through the real OpenAI server.

    python -m loadtest.quality --start-server            # make bench-quality
    python -m loadtest.quality --url http://127.0.0.1:8000 --policies caote-snapkv

``--requests`` retrieval prompts of ``--context-tokens`` tokens (the retrieval suite of
:func:`benchmarks.tasks.retrieval_suite`: three needle phrasings, each stating the key once,
in the essays and the KJV haystacks) are sent *at once* into a pool that cannot hold them all
(``--start-server`` passes ``--num-gpu-blocks-override 40``): first with no budget (stock
vLLM), then for each policy at each fraction of the prompt. Every cell sends the same prompts;
prefix caching is off on the started server, so no cell reads another's cache. Per cell:
exact-match accuracy with a Wilson 95% interval (and per phrasing, haystack and task), peak
and mean ``vllm:num_requests_running`` (polled from ``/metrics``), requests/s, output tokens/s
and time to first token p50/p99 against stock in the same run, and vLLM's preemptions.
Then (``--shorts``) short unbudgeted requests beside the long prompts, unbudgeted and budgeted:
their latency (:mod:`loadtest.shorts`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
import urllib.request

from benchmarks import provenance
from loadtest.server import serving

POLICIES = "caote-snapkv,snapkv,caote-tova,tova,caote-h2o,h2o,keydiff"
PREEMPT = re.compile(r"^vllm:num_preemptions_total\{[^}]*\}\s+([0-9.eE+-]+)", re.M)
RUNNING = re.compile(r"^vllm:num_requests_running\{[^}]*\}\s+([0-9.eE+-]+)", re.M)
WAITING = re.compile(r"^vllm:num_requests_waiting\{[^}]*\}\s+([0-9.eE+-]+)", re.M)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--url", help="a loopback server you started (prefix caching off, please)")
    g.add_argument("--start-server", action="store_true", help="start `make serve`'s server")
    p.add_argument("--model", default=None)
    p.add_argument("--served-model-name", default=None)
    p.add_argument(
        "--server-args",
        default="--num-gpu-blocks-override 40 --max-model-len 4096 --enforce-eager "
        "--no-enable-prefix-caching",
    )
    p.add_argument("--requests", type=int, default=12, help="prompts per cell, sent at once")
    p.add_argument("--context-tokens", type=int, default=1500)
    p.add_argument("--tasks", default="passkey", help="passkey,multikey")
    p.add_argument("--policies", default=POLICIES)
    p.add_argument("--fractions", default="0.25,0.125", help="budgets as prompt fractions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cell-seconds", type=float, default=900.0, help="time limit per cell")
    p.add_argument("--out", help="output folder (default benchmarks/results/<tag>/)")
    p.add_argument("--tag", default="capacity_quality")
    p.add_argument("--shorts", type=int, default=12,
                   help="short unbudgeted requests sent beside the long prompts, stock and "
                   "budgeted (first policy, first fraction); 0: skip")  # fmt: skip
    p.add_argument("--shorts-delay", type=float, default=3.0,
                   help="seconds after the long prompts the short requests arrive")  # fmt: skip
    return p.parse_args(argv)


def _scrape(url: str) -> tuple[float, float, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return tuple(sum(float(m) for m in rx.findall(text)) for rx in (RUNNING, WAITING, PREEMPT))


async def _cell(url, model, cases, budget, policy, args) -> dict:
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import (
        RequestFuncInput,
        async_request_openai_completions,
    )

    extra = {"temperature": 0.0, "kv_budget": budget or 0}
    if budget:
        extra["kv_policy"] = policy
    _, _, preempt0 = await asyncio.to_thread(_scrape, url)
    samples: list[tuple[float, float]] = []
    timeout = aiohttp.ClientTimeout(total=args.cell_seconds)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        tasks = [
            asyncio.create_task(
                async_request_openai_completions(
                    RequestFuncInput(
                        prompt=c.prompt,
                        api_url=url + "/v1/completions",
                        prompt_len=0,
                        output_len=24 if c.task == "multikey" else 12,
                        model=model,
                        extra_body=extra,
                    ),
                    session,
                )  # fmt: skip
            )
            for c in cases
        ]
        while not all(t.done() for t in tasks):
            run, wait, _ = await asyncio.to_thread(_scrape, url)
            samples.append((run, wait))
            await asyncio.sleep(0.25)
        outs = [t.result() for t in tasks]
        wall = time.perf_counter() - t0
    for _ in range(240):  # drain before the next cell
        run, wait, preempt1 = await asyncio.to_thread(_scrape, url)
        if run == 0 and wait == 0:
            break
        await asyncio.sleep(0.5)
    return summarize_cell(cases, outs, wall, samples, preempt1 - preempt0, budget, policy)


def summarize_cell(cases, outs, wall, samples, preemptions, budget, policy) -> dict:
    from benchmarks.eval.common import wilson
    from loadtest import pct

    rows = [
        dict(task=c.task, phrasing=c.phrasing, haystack=c.haystack, depth=c.depth,
             answer=c.answer, text=o.generated_text, ok=o.success,
             correct=bool(o.success and c.answer in (o.generated_text or "")),
             ttft=o.ttft if o.success else None, output_tokens=o.output_tokens or 0)
        for c, o in zip(cases, outs, strict=True)
    ]  # fmt: skip
    k, n = sum(r["correct"] for r in rows), len(rows)

    def by(key):
        groups: dict[str, list] = {}
        for r in rows:
            groups.setdefault(str(r[key]), []).append(r["correct"])
        return {g: [sum(v), len(v)] for g, v in sorted(groups.items())}

    ttft = [r["ttft"] for r in rows if r["ttft"] is not None]
    busy = [s[0] for s in samples if s[0] > 0]
    return dict(
        policy=policy or "full cache",
        budget=budget,
        correct=k,
        n=n,
        accuracy=k / n if n else 0.0,
        ci95=wilson(k, n),
        by_phrasing=by("phrasing"),
        by_haystack=by("haystack"),
        by_task=by("task"),
        errors=sum(not r["ok"] for r in rows),
        peak_running=max((s[0] for s in samples), default=0),
        mean_running=statistics.fmean(busy) if busy else 0.0,
        wall_s=wall,
        requests_per_s=n / wall,
        output_tokens_per_s=sum(r["output_tokens"] for r in rows) / wall,
        ttft_p50_s=pct(ttft, 50),
        ttft_p99_s=pct(ttft, 99),
        preemptions=preemptions,
        rows=rows,
    )


async def run(args, url) -> dict:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from benchmarks.eval.common import resolve_model
    from benchmarks.tasks import retrieval_suite

    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        served = json.load(r)["data"]
    model = args.served_model_name or served[0]["id"]
    tok = AutoTokenizer.from_pretrained(args.model or served[0].get("root") or resolve_model(None))
    tasks = tuple(t for t in args.tasks.split(",") if t)
    cases = retrieval_suite(tok, args.context_tokens, args.requests, tasks=tasks, seed=args.seed)
    prompt_tokens = statistics.fmean(len(tok.encode(c.prompt)) for c in cases)
    fractions = [float(f) for f in args.fractions.split(",") if f]
    grid = [(None, None)] + [
        (max(int(f * args.context_tokens), 164), p)
        for f in fractions
        for p in args.policies.split(",")
        if p
    ]
    cells = []
    for budget, policy in tqdm(grid, desc="capacity x quality cells", unit="cell"):
        cells.append(await _cell(url, model, cases, budget, policy, args))
        c = cells[-1]
        print(f"  {c['policy']} @ {budget}: {c['correct']}/{c['n']} correct, peak running "
              f"{c['peak_running']:.0f}, {c['wall_s']:.0f} s", file=sys.stderr)  # fmt: skip
    shorts = []
    if args.shorts > 0 and len(grid) > 1:
        from loadtest.shorts import run_scenarios

        budget, policy = grid[1]
        shorts = await run_scenarios(url, model, cases, budget, policy, args)
    stock = cells[0]
    for c in cells:
        c["peak_running_ratio"] = c["peak_running"] / max(stock["peak_running"], 1e-9)
        c["requests_per_s_ratio"] = c["requests_per_s"] / max(stock["requests_per_s"], 1e-9)
        c["ttft_p50_ratio"] = (c["ttft_p50_s"] or 0) / max(stock["ttft_p50_s"] or 0, 1e-9)
    return dict(
        requests=args.requests,
        context_tokens=args.context_tokens,
        prompt_tokens_mean=prompt_tokens,
        tasks=list(tasks),
        fractions=fractions,
        cells=cells,
        shorts=shorts,
    )


def main(argv=None) -> int:
    from benchmarks.eval.common import environment, write_results
    from loadtest.quality_report import plot, render_md

    args = parse_args(argv)
    out = provenance.out_dir(args.out, args.tag)
    prov = provenance.record("loadtest.quality", argv)  # what the started server loads
    with serving(args, out / f"{args.tag}_server.log") as (url, server_cmd):
        t0 = time.perf_counter()
        res = asyncio.run(run(args, url))
    env = environment()
    res.update(
        command=prov["command"],
        provenance=prov,
        server_cmd=server_cmd,
        wall_s=time.perf_counter() - t0,
        environment=env,
    )
    print(write_results(out, args.tag, res, render_md, plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
