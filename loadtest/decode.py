"""Decode-heavy load test: long generations into a pool that holds few of them, stock vs budgets.

    python -m loadtest.decode --start-server          # make bench-decode
    python -m loadtest.decode --start-server --quick  # ~10 min check
    python -m loadtest.decode --url http://127.0.0.1:8000 --no-ppl

``--requests`` streaming completions of ``--prompt-tokens`` KJV tokens each, generating
``--output-tokens`` tokens (``ignore_eos``), are sent *at once* to a real OpenAI server whose
pool holds few of them (``--start-server`` passes ``--num-gpu-blocks-override 40``: 40 blocks
of vLLM-CPU's 128 tokens), first with no budget (stock vLLM), then with a budget at each of
``--compressions`` of the final sequence length: ``budget = max(ceil((prompt + output) / c),
min_budget)``; the plugin keeps ``ceil(budget / block)`` whole blocks and evicts back to them
whenever a request's cache grows ``eviction_slack`` tokens past them (so a budgeted request
holds at most ``keep / block + slack / block`` blocks, its cap). Every request of every
configuration has a KJV passage of its own, so no prefix-cache hit helps one configuration
(prefix caching stays on, the server's default; its hits are reported and are 0).

Per configuration: output tokens/s and requests/s over its wall time; peak and mean
``vllm:num_requests_running`` (``/metrics`` polled every 0.5 s); TTFT and TPOT p50/p99 (TPOT of
a request: its time after the first token over its tokens after the first, measured on the
client stream, as vLLM's benchmarks do); vLLM's preemptions (``vllm:num_preemptions_total``
before vs after); the plugin's eviction time (``vllm_caote:eviction_seconds_sum``, scoring +
compaction timed in the worker) as a share of engine time. The engine is never idle during a
configuration, so wall time between two polls is engine (step) time, and the share is the
eviction seconds' increase over it: over the whole run; over its middle half; and, the
*decode steady state*, over the pure-decode poll intervals while requests were waiting (the
same requests running throughout, each producing one token per step: every step a decode
step, and the pool, not the request count, limiting concurrency), with the mean decode step
time (``vllm:iteration_tokens_total_count`` counts steps) and the decode throughput there.

Quality for the same budgets (``--ppl``, on by default): once the server has stopped (the two
never share the CPU), the in-process eval's block-wise perplexity task on KJV passages of the
final sequence length (``python -m benchmarks.eval --tasks ppl --prefill blockwise``)
with the same budgets, the same policy and block size, and a prefill chunk of one block
(``--ppl-chunk``): every block of teacher-forced tokens is then scored against a cache evicted
back to ``keep``, as decoding is. Perplexity against the full cache, in the same report.

Results: ``benchmarks/results/<tag>.json``, ``.md`` and ``.png`` (output tokens/s and peak/mean
running requests vs budget, stock marked; perplexity vs budget).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks import provenance
from loadtest.decode_summary import (
    add_ratios,
    budget_for,
    check_targets,
    label_of,
    parse_compressions,
    pool_holds,
    ppl_fractions,
    summarize_config,
)
from loadtest.server import scrape_metrics, serving

DEFAULTS = dict(requests=24, prompt_tokens=1024, output_tokens=512, ppl_passages=4)
QUICK = dict(requests=8, prompt_tokens=1024, output_tokens=128, ppl_passages=1)
#: /metrics samples read in every poll (summed over their label sets)
METRICS = {
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
    "preemptions": "vllm:num_preemptions_total",
    "generation_tokens": "vllm:generation_tokens_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "steps": "vllm:iteration_tokens_total_count",
    "prefix_cache_hits": "vllm:prefix_cache_hits_total",
    "eviction_s": "vllm_caote:eviction_seconds_sum",
    "evictions": "vllm_caote:eviction_seconds_count",
    "evicted_tokens": "vllm_caote:evicted_tokens_total",
    "recomputed_tokens": "vllm_caote:recomputed_tokens_total",
}
POLL_S = 0.5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--url", help="a loopback server you started (a small pool, please)")
    g.add_argument("--start-server", action="store_true", help="start `make serve`'s server")
    p.add_argument("--model", default=None, help="--model for --start-server (default SmolLM2)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--num-gpu-blocks-override", type=int, default=40,
                   help="KV pool of the started server, in blocks (default 40)")  # fmt: skip
    p.add_argument("--server-args", default="--max-model-len 4096 --enforce-eager",
                   help="further args for --start-server")  # fmt: skip
    p.add_argument("--requests", type=int, default=None, help="sent at once per configuration")
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--output-tokens", type=int, default=None, help="per request, ignore_eos")
    p.add_argument("--compressions", default="4,8",
                   help="budgets at these compressions of prompt + output tokens")  # fmt: skip
    p.add_argument("--policy", default="caote-snapkv")
    p.add_argument("--block-size", type=int, default=None,
                   help="the server's KV block size (default: read from /metrics, else 128)")  # fmt: skip
    p.add_argument("--ppl", action=argparse.BooleanOptionalAction, default=True,
                   help="perplexity at the same budgets afterwards (in-process eval)")  # fmt: skip
    p.add_argument("--ppl-passages", type=int, default=None, help="KJV passages (default 4)")
    p.add_argument("--ppl-chunk", type=int, default=None,
                   help="block-wise prefill chunk of the ppl run (default one block)")  # fmt: skip
    p.add_argument("--config-seconds", type=float, default=1800.0,
                   help="time limit per configuration")  # fmt: skip
    p.add_argument("--out", help="output folder (default benchmarks/results/<tag>/)")
    p.add_argument("--tag", default="decode_heavy")
    p.add_argument("--quick", action="store_true",
                   help="8 requests of 128 output tokens, one ppl passage")  # fmt: skip
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not 1 <= args.output_tokens <= 1024:
        p.error("--output-tokens must be in [1, 1024]")
    # the started server: make serve's command with a small pool
    args.server_args = f"--num-gpu-blocks-override {args.num_gpu_blocks_override} " + (
        args.server_args
    )
    return args


# --- the run ----------------------------------------------------------------------------------


def _poll(url: str) -> dict:
    m = scrape_metrics(url)
    return {k: m.get(name, 0.0) for k, name in METRICS.items()}


def _server_info(url: str) -> dict:
    """Block size and pool from vLLM's ``vllm:cache_config_info`` labels, when exported."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    info = {}
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info"):
            for key in ("block_size", "num_gpu_blocks", "enable_prefix_caching"):
                m = re.search(rf'\b{key}="([^"]*)"', line)
                if m:
                    info[key] = m.group(1)
    return info


async def _drain(url: str, seconds: float = 120.0) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        m = await asyncio.to_thread(_poll, url)
        if m["running"] == 0 and m["waiting"] == 0:
            return
        await asyncio.sleep(1)


async def run_config(url, model, prompts, budget, args, desc) -> tuple:
    import aiohttp
    from tqdm import tqdm

    from loadtest import _one

    before = await asyncio.to_thread(_poll, url)
    samples: list[dict] = []
    pbar = tqdm(total=len(prompts), desc=desc, unit="req")
    timeout = aiohttp.ClientTimeout(total=args.config_seconds)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        tasks = [
            asyncio.create_task(
                _one(session, url, model, ids, args.output_tokens, budget, args.policy, pbar)
            )
            for ids in prompts
        ]
        while not all(t.done() for t in tasks):
            m = await asyncio.to_thread(_poll, url)
            samples.append(dict(m, t=round(time.perf_counter() - t0, 3)))
            await asyncio.sleep(POLL_S)
        wall = time.perf_counter() - t0
        outs = [t.result()[1] for t in tasks]
    pbar.close()
    await _drain(url)
    after = await asyncio.to_thread(_poll, url)
    return outs, wall, samples, before, after


async def run(args, url) -> dict:
    from transformers import AutoTokenizer

    from benchmarks.eval.common import resolve_model
    from benchmarks.tasks import filler_prompt_ids, haystack_ids
    from loadtest import _one
    from vllm_caote.config import settings

    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        served = json.load(r)["data"]
    model = args.served_model_name or served[0]["id"]
    tok = AutoTokenizer.from_pretrained(args.model or served[0].get("root") or resolve_model(None))
    info = await asyncio.to_thread(_server_info, url)
    bs = args.block_size or int(info.get("block_size") or 128)
    min_budget = settings().min_budget(bs)
    slack = settings().eviction_slack  # the server's default, unless its config changed it
    compressions = parse_compressions(args.compressions)
    grid: list[tuple[str, dict | None]] = [("stock", None)] + [
        (label_of(c), budget_for(args.prompt_tokens, args.output_tokens, c, bs, min_budget, slack))
        for c in compressions
    ]
    kjv = haystack_ids(tok, "kjv")
    n, length = args.requests, args.prompt_tokens
    stride = length + 97  # every request of every configuration: a passage of its own
    if stride * n * len(grid) > len(kjv):
        raise SystemExit(f"{n} requests x {len(grid)} configurations of {length} tokens do not "
                         f"fit in the KJV ({len(kjv)} tokens)")  # fmt: skip
    # warm-up (not measured): one stock and one evicting request, essay text (no KJV overlap)
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for i, b in enumerate((None, min_budget)):
            ids = filler_prompt_ids(tok, 2 * bs + 64, 3000 * i)
            await _one(session, url, model, ids, 8, b, args.policy)
    await _drain(url)

    configs = []
    for phase, (label, binfo) in enumerate(grid):
        offsets = [(phase * n + i) * stride for i in range(n)]
        prompts = [kjv[o : o + length] for o in offsets]
        budget = None if binfo is None else binfo["budget"]
        outs, wall, samples, before, after = await run_config(
            url, model, prompts, budget, args, f"{label} (budget {budget or '-'})"
        )
        c = summarize_config(label, binfo, outs, wall, samples, before, after)
        configs.append(c)
        st = c["decode"]
        print(f"  {label}: {c['output_tokens_per_s']:.1f} out tok/s, {c['requests_per_s']:.3f} "
              f"req/s, running peak {c['peak_running']:.0f} mean {c['mean_running']:.1f}, "
              f"{c['preemptions']:.0f} preemptions, eviction {100 * c['eviction_share']:.1f}% "
              f"(decode steady state {100 * st.get('eviction_share', 0):.1f}%), {c['errors']} errors, "
              f"{wall:.0f} s", file=sys.stderr)  # fmt: skip
    add_ratios(configs)
    pool = int(info.get("num_gpu_blocks") or args.num_gpu_blocks_override)
    seq = args.prompt_tokens + args.output_tokens
    return dict(
        requests=n,
        prompt_tokens=length,
        output_tokens=args.output_tokens,
        sequence_tokens=seq,
        policy=args.policy,
        block_size=bs,
        min_budget=min_budget,
        pool_blocks=pool,
        server_cache_config=info,
        pool_holds={
            "stock": pool_holds(pool, math.ceil(seq / bs)),
            **{lb: pool_holds(pool, b["cap_blocks"]) for lb, b in grid if b},
        },
        prompts="KJV passages, one per request and configuration (no prefix-cache sharing)",
        configs=configs,
    )


def run_ppl(args, res: dict, out: Path) -> dict:
    """The eval's block-wise perplexity at the decode run's budgets, in a subprocess."""
    infos = [c for c in res["configs"] if c["budget"]]
    fractions = ppl_fractions(infos)
    chunk = args.ppl_chunk or res["block_size"]
    tag = f"{args.tag}_ppl"
    cmd = [
        sys.executable, "-m", "benchmarks.eval", "--tasks", "ppl", "--prefill", "blockwise",
        "--prefill-chunk", str(chunk), "--block-size", str(res["block_size"]),
        "--contexts", str(res["sequence_tokens"]), "--budgets", ",".join(map(repr, fractions)),
        "--policies", args.policy, "--ppl-passages", str(args.ppl_passages),
        "--kv-space", "2", "--out", str(out), "--tag", tag,
    ]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    print("ppl: " + " ".join(cmd[1:]), file=sys.stderr)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    ev = json.loads((out / f"{tag}.json").read_text())
    cells = ev["summary"]["ppl"]
    full = cells["full"]["full"]
    rows = {"stock": dict(budget=None, ppl=full["ppl"], ppl_tail=full["ppl_tail"])}
    for c, f in zip(infos, fractions, strict=True):
        cell = cells[args.policy][f"{f:g}"]
        assert cell["budgets"] == [c["budget"]], (cell["budgets"], c["budget"])
        rows[c["label"]] = dict(
            budget=c["budget"],
            ppl=cell["ppl"],
            ppl_tail=cell["ppl_tail"],
            ppl_ratio=cell["ppl"] / full["ppl"],
            ppl_tail_ratio=cell["ppl_tail"] / full["ppl_tail"] if full["ppl_tail"] else None,
        )
    return dict(
        command="python " + " ".join(cmd[1:]),
        results=f"{tag}.json",
        context=res["sequence_tokens"],
        chunk=chunk,
        passages=args.ppl_passages,
        tokens_scored=full["tokens_scored"],
        wall_s=time.perf_counter() - t0,
        rows=rows,
    )


def main(argv=None) -> int:
    from benchmarks.eval.common import environment, write_results
    from loadtest.decode_report import plot, render_md

    args = parse_args(argv)
    out = provenance.out_dir(args.out, args.tag)
    t0 = time.perf_counter()
    prov = provenance.record("loadtest.decode", argv)  # what the started server loads
    with serving(args, out / f"{args.tag}_server.log") as (url, server_cmd):
        res = asyncio.run(run(args, url))
    res["ppl"] = run_ppl(args, res, out) if args.ppl else None
    res["targets"] = check_targets(res["configs"])
    res.update(
        command=prov["command"],
        provenance=prov,
        server_cmd=server_cmd,
        quick=args.quick,
        wall_s=time.perf_counter() - t0,
        environment=environment(),
    )
    print(write_results(out, args.tag, res, render_md, plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
