"""Load test of a real vLLM OpenAI server with the vllm-caote plugin (loopback only).

    python -m loadtest --start-server                       # starts its own server (make serve)
    python -m loadtest --url http://127.0.0.1:8000          # a server you started
    python -m loadtest --start-server --quick

Three parts, each bounded in request count and in time:

* ``mixed``: ``--requests`` streaming completions with long prompts (``--prompt-tokens`` token
  ids of essay text), at most ``--concurrency`` in flight, budgets cycling through
  ``--budgets`` (``none`` = ``kv_budget: 0``, the stock path even when the server has a default
  budget). Reports throughput, TTFT and TPOT p50/p99 (overall and per budget), errors.
* ``capacity``: the same KV pool with and without ``kv_budget``: ``--cap-requests`` requests of
  ``--cap-prompt-tokens`` tokens sent at once, first all without a budget, then all with
  ``--cap-budget``; ``vllm:num_requests_running`` is polled from ``/metrics`` during each phase
  (``--cap-seconds`` at most, then the remaining requests are cancelled). Meaningful against a
  server with a small pool: ``--start-server`` passes ``--num-gpu-blocks-override 40``.

* ``throughput``: the ``capacity`` requests, run to completion: stock, then with budgets at 4x
  and 8x compression of the prompt; requests/s, output tokens/s and TTFT, ratios vs stock.
* ``room``: time to first token when the pool has room: ``--room-requests`` pairs of
  ``--prompt-tokens`` prompts sent one at a time, alternating no budget and a 4x budget; TTFT
  p50 of each and their ratio (adaptive prefill: one step, then one eviction).

Requests go through vLLM's own benchmark client
(``vllm.benchmarks.lib.endpoint_request_func.async_request_openai_completions``, the one
``vllm bench serve`` uses), so TTFT/ITL are measured exactly as vLLM's benchmarks measure them.
``vllm bench serve`` itself is not used: it sends one ``extra_body`` for all requests (no mixed
budgets) and does not watch ``/metrics`` for concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import time
import urllib.parse
import urllib.request

from benchmarks import provenance
from loadtest.report import render_md
from loadtest.server import check_loopback as check_loopback  # re-exported
from loadtest.server import serving

DEFAULTS = dict(
    requests=12,
    concurrency=4,
    prompt_tokens=1536,
    output_tokens=32,
    cap_requests=8,
    cap_prompt_tokens=2048,
    cap_seconds=120.0,
    duration=600.0,
    room_requests=5,
)
QUICK = dict(
    requests=6,
    concurrency=3,
    prompt_tokens=1024,
    output_tokens=16,
    cap_requests=6,
    cap_prompt_tokens=2048,
    cap_seconds=60.0,
    duration=300.0,
    room_requests=3,
)
RUNNING = re.compile(r"^vllm:num_requests_running\{[^}]*\}\s+([0-9.eE+-]+)", re.M)
WAITING = re.compile(r"^vllm:num_requests_waiting\{[^}]*\}\s+([0-9.eE+-]+)", re.M)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--url", help="server base URL, loopback only (e.g. http://127.0.0.1:8000)")
    g.add_argument(
        "--start-server",
        action="store_true",
        help="start a server with the `make serve` command on a free loopback port",
    )
    p.add_argument("--model", default=None, help="--model for --start-server (default SmolLM2)")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="model name in requests (default: the server's first model)",
    )
    p.add_argument(
        "--server-args",
        default="--num-gpu-blocks-override 40 --max-model-len 4096 --enforce-eager",
        help="extra args for --start-server",
    )
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--output-tokens", type=int, default=None)
    p.add_argument(
        "--budgets",
        default="none,512,1024,164",
        help="budgets cycled over the mixed requests; 'none' = kv_budget 0",
    )
    p.add_argument("--policy", default="caote-snapkv")
    p.add_argument("--cap-requests", type=int, default=None)
    p.add_argument("--cap-prompt-tokens", type=int, default=None)
    p.add_argument("--cap-budget", type=int, default=512)
    p.add_argument("--cap-seconds", type=float, default=None, help="time limit per phase")
    p.add_argument("--duration", type=float, default=None, help="time limit of the mixed part")
    p.add_argument("--room-requests", type=int, default=None, help="pairs in the room part")
    p.add_argument("--parts", default="mixed,capacity,throughput,room")
    p.add_argument("--out", help="output folder (default benchmarks/results/<tag>/)")
    p.add_argument("--tag", default="loadtest")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not args.url and not args.start_server:
        p.error("give --url http://127.0.0.1:PORT or --start-server")
    return args


def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation, as vLLM's benchmarks report), None if empty."""
    import numpy as np

    return float(np.percentile(xs, q)) if xs else None


def _budget_body(budget: int | None, policy: str) -> dict:
    return {"kv_budget": 0} if budget is None else {"kv_budget": budget, "kv_policy": policy}


def _parse_budgets(s: str) -> list[int | None]:
    return [None if b.strip().lower() in ("none", "0", "") else int(b) for b in s.split(",")]


async def _one(session, url, model, ids, out_tokens, budget, policy, pbar=None):
    from vllm.benchmarks.lib.endpoint_request_func import (
        RequestFuncInput,
        async_request_openai_completions,
    )

    inp = RequestFuncInput(
        prompt=ids,
        api_url=url + "/v1/completions",
        prompt_len=len(ids),
        output_len=out_tokens,
        model=model,
        extra_body=_budget_body(budget, policy),
        ignore_eos=True,
    )
    out = await async_request_openai_completions(inp, session, pbar)
    return budget, out


def _latency_stats(outs) -> dict:
    ok = [o for o in outs if o.success]
    ttft = [o.ttft for o in ok]
    tpot = [
        (o.latency - o.ttft) / (o.output_tokens - 1)
        for o in ok
        if o.output_tokens and o.output_tokens > 1
    ]
    return dict(
        requests=len(outs),
        ok=len(ok),
        errors=len(outs) - len(ok),
        ttft_p50_s=pct(ttft, 50),
        ttft_p99_s=pct(ttft, 99),
        tpot_p50_ms=None if not tpot else 1000 * pct(tpot, 50),
        tpot_p99_ms=None if not tpot else 1000 * pct(tpot, 99),
        output_tokens=sum(o.output_tokens or 0 for o in ok),
        prompt_tokens=sum(o.prompt_len or 0 for o in ok),
    )


async def mixed(url, model, tok, args) -> dict:
    import aiohttp
    from tqdm import tqdm

    from benchmarks.tasks import filler_prompt_ids

    budgets = _parse_budgets(args.budgets)
    sem = asyncio.Semaphore(args.concurrency)
    pbar = tqdm(total=args.requests, desc="mixed requests")
    timeout = aiohttp.ClientTimeout(total=args.duration + 60)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def guarded(i):
            async with sem:
                ids = filler_prompt_ids(tok, args.prompt_tokens, 1700 * i)
                return await _one(
                    session,
                    url,
                    model,
                    ids,
                    args.output_tokens,
                    budgets[i % len(budgets)],
                    args.policy,
                    pbar,
                )

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(guarded(i)) for i in range(args.requests)]
        done, pending = await asyncio.wait(tasks, timeout=args.duration)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - t0
    pbar.close()
    results = [t.result() for t in done if not t.cancelled() and t.exception() is None]
    outs = [o for _, o in results]
    res = dict(
        _latency_stats(outs),
        wall_s=wall,
        cancelled_at_time_limit=len(pending),
        concurrency=args.concurrency,
        prompt_tokens_each=args.prompt_tokens,
        output_tokens_each=args.output_tokens,
    )
    res["throughput_req_s"] = res["ok"] / wall
    res["throughput_out_tok_s"] = res["output_tokens"] / wall
    res["throughput_total_tok_s"] = (res["output_tokens"] + res["prompt_tokens"]) / wall
    res["by_budget"] = {
        str(b or "none"): _latency_stats([o for bb, o in results if bb == b]) for b in budgets
    }
    res["error_samples"] = [o.error[-300:] for o in outs if not o.success][:3]
    return res


def _metrics(url: str) -> tuple[float, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    run = sum(float(m) for m in RUNNING.findall(text))
    wait = sum(float(m) for m in WAITING.findall(text))
    return run, wait


async def capacity(url, model, tok, args) -> dict:
    import aiohttp

    from benchmarks.tasks import filler_prompt_ids

    res = {}
    for phase, (mode, budget) in enumerate((("stock", None), ("budgeted", args.cap_budget))):
        samples = []
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=args.cap_seconds + 60)
        ) as session:
            tasks = [
                asyncio.create_task(
                    _one(
                        session,
                        url,
                        model,
                        # each phase its own prompts (apart from the mixed part's): no prefix hits
                        filler_prompt_ids(
                            tok, args.cap_prompt_tokens, 25000 + 2300 * i + 20000 * phase
                        ),
                        args.output_tokens,
                        budget,
                        args.policy,
                    )
                )
                for i in range(args.cap_requests)
            ]
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < args.cap_seconds and not all(t.done() for t in tasks):
                run, wait = await asyncio.to_thread(_metrics, url)
                samples.append((round(time.perf_counter() - t0, 2), run, wait))
                await asyncio.sleep(0.25)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # let the server notice the disconnects and drain before the next phase
        t1 = time.perf_counter()
        while time.perf_counter() - t1 < 120:
            run, wait = await asyncio.to_thread(_metrics, url)
            if run == 0 and wait == 0:
                break
            await asyncio.sleep(1)
        done = sum(1 for t in tasks if t.done() and not t.cancelled())
        res[mode] = dict(
            max_running=max((s[1] for s in samples), default=0),
            mean_running=statistics.fmean(s[1] for s in samples) if samples else 0,
            max_waiting=max((s[2] for s in samples), default=0),
            completed=done,
            samples=samples,
            budget=budget,
        )
    res["ratio_max_running"] = res["budgeted"]["max_running"] / max(1, res["stock"]["max_running"])
    res.update(
        requests=args.cap_requests,
        prompt_tokens=args.cap_prompt_tokens,
        seconds_per_phase=args.cap_seconds,
    )
    return res


async def throughput(url, model, tok, args) -> dict:
    """The same ``--cap-requests`` requests sent at once, run to completion: stock, then with
    budgets at 4x and 8x compression of the prompt. Requests and output tokens per second,
    TTFT, errors; ratios against stock in the same pool."""
    import aiohttp

    from benchmarks.tasks import filler_prompt_ids

    n, length = args.cap_requests, args.cap_prompt_tokens
    res: dict = {}
    for phase, (label, compression) in enumerate((("stock", None), ("4x", 4), ("8x", 8))):
        budget = None if compression is None else length // compression
        # prompts of their own per phase (and apart from the other parts'): no prefix-cache
        # hit may make one phase cheaper than another
        offsets = [60000 + 20000 * phase + 2300 * i for i in range(n)]
        prompts = [filler_prompt_ids(tok, length, off) for off in offsets]
        timeout = aiohttp.ClientTimeout(total=args.duration)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            t0 = time.perf_counter()
            outs = await asyncio.gather(
                *(_one(session, url, model, ids, args.output_tokens, budget, args.policy)
                  for ids in prompts)
            )  # fmt: skip
            wall = time.perf_counter() - t0
        stats = _latency_stats([o for _, o in outs])
        res[label] = dict(
            stats,
            budget=budget,
            wall_s=wall,
            requests_per_s=stats["ok"] / wall,
            output_tokens_per_s=stats["output_tokens"] / wall,
        )
    for label in ("4x", "8x"):
        res[label]["throughput_ratio"] = res[label]["requests_per_s"] / max(
            res["stock"]["requests_per_s"], 1e-9
        )
        res[label]["ttft_p50_ratio"] = (res[label]["ttft_p50_s"] or 0) / max(
            res["stock"]["ttft_p50_s"] or 0, 1e-9
        )
    res.update(requests=args.cap_requests, prompt_tokens=args.cap_prompt_tokens)
    return res


async def room(url, model, tok, args) -> dict:
    """TTFT with room in the pool: one request at a time, alternating unbudgeted and budgeted
    (4x compression) prompts of ``--prompt-tokens`` tokens, each prompt new to the server."""
    import aiohttp

    from benchmarks.tasks import filler_prompt_ids

    length, budget = args.prompt_tokens, args.prompt_tokens // 4
    by: dict[str, list] = {"stock": [], "4x": []}
    timeout = aiohttp.ClientTimeout(total=args.duration)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for i in range(args.room_requests):
            for j, label in enumerate(("stock", "4x")):
                ids = filler_prompt_ids(tok, length, 120000 + length * (2 * i + j))
                b = None if label == "stock" else budget
                by[label].append(
                    (await _one(session, url, model, ids, args.output_tokens, b, args.policy))[1]
                )
    res: dict = {label: _latency_stats(outs) for label, outs in by.items()}
    res["4x"]["budget"] = budget
    res["ttft_p50_ratio"] = (res["4x"]["ttft_p50_s"] or 0) / max(
        res["stock"]["ttft_p50_s"] or 0, 1e-9
    )
    res.update(pairs=args.room_requests, prompt_tokens=length)
    return res


async def _run(args, url) -> dict:
    from transformers import AutoTokenizer

    from benchmarks.eval.common import resolve_model

    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        served = json.load(r)["data"]
    model = args.served_model_name or served[0]["id"]
    tok_src = args.model or served[0].get("root") or resolve_model(None)
    tok = AutoTokenizer.from_pretrained(tok_src)
    res: dict = {}
    parts = args.parts.split(",")
    if "mixed" in parts:
        res["mixed"] = await mixed(url, model, tok, args)
    if "capacity" in parts:
        res["capacity"] = await capacity(url, model, tok, args)
    if "throughput" in parts:
        res["throughput"] = await throughput(url, model, tok, args)
    if "room" in parts:
        res["room"] = await room(url, model, tok, args)
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    out = provenance.out_dir(args.out, args.tag)
    prov = provenance.record("loadtest", argv)
    with serving(args, out / f"{args.tag}_server.log") as (url, server_cmd):
        t0 = time.perf_counter()
        res = asyncio.run(_run(args, url))
    res.update(
        command=prov["command"],
        provenance=prov,
        server_cmd=server_cmd,
        budgets=args.budgets,
        policy=args.policy,
        server_env={
            k: os.environ.get(k, d)
            for k, d in (
                ("CAOTE_DEFAULT_BUDGET", "0"),
                ("CAOTE_DEFAULT_POLICY", "caote-snapkv"),
                ("VLLM_CPU_KVCACHE_SPACE", "4"),
            )
        }
        if server_cmd
        else None,
        wall_s=time.perf_counter() - t0,
    )
    from benchmarks.eval.common import write_results

    print(write_results(out, args.tag, res, render_md))
    return 0
