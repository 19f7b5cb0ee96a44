"""Engine benchmark of the plugin against stock vLLM, in one run (``make bench``).

    python -m benchmarks            # default settings
    python -m benchmarks --quick    # smaller: fewer requests, fewer decode tokens

One in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with a shrunk KV pool
(``num_gpu_blocks_override``, default 40 blocks). Requests without ``kv_budget`` take vLLM's own
path (the plugin does nothing for them), so "stock" and "budgeted" run on the same engine.

(a) capacity: N concurrent requests with prompts ~4x the budget (2048 tokens, budget 512);
    after every ``engine.step()`` read ``len(scheduler.running)``; peak, mean and steady-state
    (median over the second half of the steps) running, budgeted vs stock, their ratios, and
    how often vLLM preempted a request because the pool ran dry. Each phase is bounded (``--capacity-steps``): once the
    scheduler has admitted what fits, running it to completion adds nothing to the measurement.
(b) decode overhead: B requests x T decode tokens at equal batch; per-output-token time of pure
    decode steps (every running request past its prompt), three variants: stock (no budget),
    ``budget >= sequence`` (hooks active, nothing evicted) and a budget that forces decode
    evictions. Median of ``--repeats`` runs; ratio to stock.
(c) eviction cost per evicted block: (i) the extra time of the steps that evicted over the
    median non-evicting step, per block evicted in them; (ii) the decode-time difference between
    the evicting and the no-eviction variant, divided by the blocks evicted while decoding.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from benchmarks import provenance, shared_prefix
from benchmarks.eval.common import (
    Driver,
    block_size_of,
    environment,
    make_llm,
    min_budget_of,
    sampling,
    write_results,
)

# decode: after a 300-token prompt the evicting budget (engine minimum, keep = 2 blocks) leaves
# 256 tokens; the cache reaches keep + slack (eviction_slack: 128 tokens, one block) after 128
# more tokens, so 136 decode tokens give one decode eviction per request (128 would stop just
# short of it).
DEFAULTS = dict(
    cap_requests=8,
    cap_prompt=2048,
    cap_budget=512,
    cap_max_tokens=64,
    cap_steps=24,
    batch=4,
    decode_tokens=136,
    decode_prompt=300,
    repeats=5,
)
QUICK = dict(
    cap_requests=6,
    cap_prompt=2048,
    cap_budget=512,
    cap_max_tokens=8,
    cap_steps=5,
    batch=4,
    decode_tokens=136,
    decode_prompt=300,
    repeats=3,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="local HF folder or hub id (default: SmolLM2)")
    p.add_argument("--blocks", type=int, default=40, help="num_gpu_blocks_override (KV pool)")
    p.add_argument("--policy", default="caote-snapkv")
    p.add_argument("--cap-requests", type=int, default=None)
    p.add_argument("--cap-prompt", type=int, default=None, help="capacity prompt tokens")
    p.add_argument("--cap-budget", type=int, default=None)
    p.add_argument("--cap-max-tokens", type=int, default=None)
    p.add_argument(
        "--cap-steps",
        type=int,
        default=None,
        help="engine steps per capacity phase before the rest is aborted",
    )
    p.add_argument("--batch", type=int, default=None, help="decode batch size")
    p.add_argument("--decode-tokens", type=int, default=None)
    p.add_argument("--decode-prompt", type=int, default=None, help="decode prompt tokens")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", help="output folder (default benchmarks/results/<tag>/)")
    p.add_argument("--tag", default="bench")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def capacity(llm, args, bar) -> dict:
    from benchmarks.tasks import filler_prompt_ids

    tok = llm.get_tokenizer()
    res = {}
    for mode in ("stock", "budgeted"):
        d = Driver(llm)
        for i in range(args.cap_requests):
            ids = filler_prompt_ids(tok, args.cap_prompt, 2500 * i)
            budget = args.cap_budget if mode == "budgeted" else None
            d.add(
                ids,
                sampling(
                    args.cap_max_tokens,
                    budget,
                    args.policy if budget else None,
                    ignore_eos=True,
                    skip_reading_prefix_cache=True,  # no reuse: the shared-prefix part measures it
                ),
            )
        t0 = time.perf_counter()
        out = d.run(args.cap_steps, on_step=lambda r: bar.update(1))
        running = [s["running"] for s in out["steps"]]
        res[mode] = dict(
            max_running=max(running),
            mean_running=statistics.fmean(running),
            steps=len(running),
            wall_s=time.perf_counter() - t0,
            finished=len(out["finished"]),
            min_free_blocks=min(s["free_blocks"] for s in out["steps"]),
            preemptions=sum(d.preemptions.values()),
            steady_running=statistics.median(running[len(running) // 2 :]),
            running_per_step=running,
        )
    res["ratio_max_running"] = res["budgeted"]["max_running"] / max(1, res["stock"]["max_running"])
    res["ratio_steady_running"] = res["budgeted"]["steady_running"] / max(
        1, res["stock"]["steady_running"]
    )
    return res


def decode_variants(args, min_budget: int, bs: int) -> dict:
    seq = args.decode_prompt + args.decode_tokens
    # The evicting budget: the engine minimum (keep = ceil(B/bs) blocks); decode evicts back to
    # keep every time the cache reaches keep + slack (eviction_slack in whole blocks).
    return {
        "stock": None,
        "no_evict": max(seq + bs, min_budget),  # budget >= sequence: hooks on, nothing evicted
        "evicting": min_budget,
    }


def decode(llm, args, bar, min_budget: int, bs: int) -> dict:
    from benchmarks.tasks import filler_prompt_ids

    tok = llm.get_tokenizer()
    variants = decode_variants(args, min_budget, bs)
    runs: dict = {k: [] for k in variants}
    for _rep in range(args.repeats):
        for name, budget in variants.items():
            d = Driver(llm)
            for i in range(args.batch):
                ids = filler_prompt_ids(tok, args.decode_prompt, 40000 + 3000 * i)
                d.add(
                    ids,
                    sampling(
                        args.decode_tokens,
                        budget,
                        args.policy if budget else None,
                        ignore_eos=True,
                        skip_reading_prefix_cache=True,  # repeats must not hit earlier runs
                    ),
                )
            out = d.run(on_step=lambda r: bar.update(1))
            full = [s for s in out["steps"] if s["decode_only"] and s["batch"] == args.batch]
            ev = [s for s in full if s["evicted_tokens"] > 0]
            plain = [s for s in full if s["evicted_tokens"] == 0]
            decode_time = sum(s["dt"] for s in full)
            tokens = args.batch * len(full)
            stats = [
                o.kv_transfer_params.get("kv_eviction") if o.kv_transfer_params else None
                for o in out["finished"].values()
            ]
            runs[name].append(
                dict(
                    per_token_ms=1000 * decode_time / tokens,
                    decode_steps=len(full),
                    decode_time_s=decode_time,
                    median_plain_step_ms=1000 * statistics.median(s["dt"] for s in plain),
                    evict_steps=len(ev),
                    evict_steps_time_s=sum(s["dt"] for s in ev),
                    decode_evicted_tokens=sum(s["evicted_tokens"] for s in full),
                    total_evicted_tokens=sum(s["evicted_tokens"] for s in stats if s),
                )
            )
    res: dict = {"variants": {k: v for k, v in variants.items()}, "runs": runs}
    med = {k: statistics.median(r["per_token_ms"] for r in v) for k, v in runs.items()}
    res["per_token_ms_median"] = med
    res["overhead_no_evict"] = med["no_evict"] / med["stock"] - 1
    res["overhead_evicting"] = med["evicting"] / med["stock"] - 1
    # (c) eviction cost per evicted block
    per_block_i, per_block_ii = [], []
    for r_ev, r_ne in zip(runs["evicting"], runs["no_evict"], strict=True):
        blocks = r_ev["decode_evicted_tokens"] / bs
        if blocks and r_ev["evict_steps"]:
            extra = (
                r_ev["evict_steps_time_s"]
                - r_ev["evict_steps"] * r_ev["median_plain_step_ms"] / 1000
            )
            per_block_i.append(1000 * extra / blocks)
            per_block_ii.append(1000 * (r_ev["decode_time_s"] - r_ne["decode_time_s"]) / blocks)
    res["evict_cost_ms_per_block_steps"] = statistics.median(per_block_i) if per_block_i else None
    res["evict_cost_ms_per_block_diff"] = statistics.median(per_block_ii) if per_block_ii else None
    return res


def render_md(r: dict) -> str:
    c, d, cfg = r["capacity"], r["decode"], r["config"]
    ms = d["per_token_ms_median"]
    lines = [
        f"# vllm-caote engine benchmark ({Path(cfg['model']).name})",
        "",
        *provenance.markdown(r),
        f"In-process vLLM {r['environment']['vllm']} (CPU: {r['environment']['cpu_count']} "
        f"cores, shared with other jobs), KV pool {cfg['blocks']} blocks x {cfg['block_size']} "
        f"tokens, policy `{cfg['policy']}`. Wall time {r['wall_s']:.0f} s.",
        "",
        "## (a) Capacity: max requests running at once in the same KV pool",
        "",
        f"{cfg['cap_requests']} requests of {cfg['cap_prompt']} prompt tokens, "
        f"{cfg['cap_max_tokens']} output tokens; budget {cfg['cap_budget']} (prompt = "
        f"{cfg['cap_prompt'] / cfg['cap_budget']:.0f}x budget); first {cfg['cap_steps']} engine "
        "steps per phase, `len(scheduler.running)` after every step.",
        "",
        "| | stock vLLM | kv_budget | ratio |",
        "|---|---|---|---|",
        f"| max running | {c['stock']['max_running']} | {c['budgeted']['max_running']} | "
        f"**{c['ratio_max_running']:.2f}x** |",
        f"| mean running | {c['stock']['mean_running']:.2f} | {c['budgeted']['mean_running']:.2f}"
        f" | {c['budgeted']['mean_running'] / max(c['stock']['mean_running'], 1e-9):.2f}x |",
        f"| running, median of the second half of the steps (steady state) | "
        f"{c['stock']['steady_running']:g} | {c['budgeted']['steady_running']:g} | "
        f"**{c['ratio_steady_running']:.2f}x** |",
        f"| min free blocks | {c['stock']['min_free_blocks']} | "
        f"{c['budgeted']['min_free_blocks']} | |",
        f"| preemptions (vLLM's, when the pool runs dry) | {c['stock']['preemptions']} | "
        f"{c['budgeted']['preemptions']} | |",
        "",
        "## (b) Decode time per output token",
        "",
        f"{cfg['batch']} requests x {cfg['decode_tokens']} decode tokens, prompt "
        f"{cfg['decode_prompt']} tokens; pure-decode steps only; median of {cfg['repeats']} runs.",
        "",
        "| variant | kv_budget | ms / output token (median) | vs stock | runs (ms) | "
        "evicted tokens while decoding |",
        "|---|---|---|---|---|---|",
    ]
    for k, label in (
        ("stock", "stock vLLM"),
        ("no_evict", "budget >= sequence (hooks only)"),
        ("evicting", "budget forcing decode evictions"),
    ):
        ev = statistics.median(x["decode_evicted_tokens"] for x in d["runs"][k])
        rel = ms[k] / ms["stock"] - 1
        runs = ", ".join(f"{x['per_token_ms']:.1f}" for x in d["runs"][k])
        lines.append(
            f"| {label} | {d['variants'][k] or '-'} | {ms[k]:.2f} | {rel:+.1%} | {runs} | "
            f"{ev:.0f} |"
        )
    c1, c2 = d["evict_cost_ms_per_block_steps"], d["evict_cost_ms_per_block_diff"]
    lines += [
        "",
        "## (c) Eviction cost",
        "",
        f"- extra time of evicting steps over the median plain step: "
        f"{'n/a' if c1 is None else f'{c1:.2f} ms'} per evicted block "
        f"({cfg['block_size']} tokens, all layers)",
        f"- decode-time difference evicting vs no-eviction / blocks evicted: "
        f"{'n/a' if c2 is None else f'{c2:.2f} ms'} per block (includes the shorter cache "
        "the evicting variant attends over, so it can be lower or negative)",
        "",
        "## Targets",
        "",
        f"- capacity >= 3x (steady state): "
        f"**{'met' if c['ratio_steady_running'] >= 3 else 'not met'}** "
        f"({c['ratio_steady_running']:.2f}x; peak {c['ratio_max_running']:.2f}x)",
        f"- decode overhead <= 10% (evicting budget): "
        f"**{'met' if d['overhead_evicting'] <= 0.10 else 'not met'}** "
        f"({d['overhead_evicting']:+.1%}); hooks only: {d['overhead_no_evict']:+.1%}",
        "",
    ]
    if r.get("shared_prefix"):
        lines += shared_prefix.render_md(r["shared_prefix"])
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(lines)


def plot(r: dict, out_dir: Path, tag: str) -> list[str]:
    path = Path(out_dir) / f"{tag}.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, d = r["capacity"], r["decode"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, style in (("stock", "--"), ("budgeted", "-")):
        a1.plot(
            c[mode]["running_per_step"],
            style,
            marker=".",
            label=f"{mode} (max {c[mode]['max_running']})",
        )
    a1.set_xlabel("engine step")
    a1.set_ylabel("requests running")
    a1.set_title(
        f"capacity, {r['config']['blocks']}-block pool, {r['config']['cap_prompt']}-token prompts"
    )
    a1.legend()
    a1.grid(alpha=0.3)
    names = ["stock", "no_evict", "evicting"]
    vals = [d["per_token_ms_median"][k] for k in names]
    spread = [[x["per_token_ms"] for x in d["runs"][k]] for k in names]
    a2.bar(["stock", "budget>=seq", "evicting"], vals, color=["grey", "tab:blue", "tab:orange"])
    for i, s in enumerate(spread):
        a2.plot([i] * len(s), s, "k.", alpha=0.6)
    a2.set_ylabel("ms per output token (decode)")
    a2.set_title(f"decode, batch {r['config']['batch']}, median of {r['config']['repeats']}")
    a2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = provenance.out_dir(args.out, args.tag)
    prov = provenance.record("benchmarks", argv)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    max_len = max(4096, args.cap_prompt + args.cap_max_tokens + 256)
    llm = make_llm(args.model, max_model_len=max_len, num_gpu_blocks_override=args.blocks)
    bs, min_b = block_size_of(llm), min_budget_of(llm)
    if args.cap_budget < min_b:
        print(f"--cap-budget {args.cap_budget} < engine minimum {min_b}; clamped", file=sys.stderr)
        args.cap_budget = min_b
    est = 2 * args.cap_steps + args.repeats * 3 * (args.decode_tokens + 2)
    with tqdm(total=est, desc="bench steps", unit="step") as bar:
        bar.set_postfix_str("capacity")
        cap = capacity(llm, args, bar)
        bar.set_postfix_str("decode")
        dec = decode(llm, args, bar, min_b, bs)
        bar.set_postfix_str("shared prefix")
        shared = shared_prefix.shared_prefix(llm, args.policy, requests=3 if args.quick else 6)
    cfg = {k: v for k, v in vars(args).items() if k not in ("out", "tag")}
    cfg.update(
        model=str(llm.llm_engine.model_config.model),
        block_size=bs,
        min_budget=min_b,
        pool_tokens=args.blocks * bs,
        command=prov["command"],
    )
    notes = [
        "Per-token times come from the wall time of engine.step() calls in which every "
        "running request was decoding (prefill steps excluded).",
        "The evicting variant attends over a smaller cache (<= keep + eviction_slack) than "
        "stock, "
        "which partly offsets the cost of scoring and compaction.",
        f"Stock vLLM admits a request only if its whole prompt fits the pool "
        f"({args.blocks * bs} tokens); with kv_budget the plugin caps the admission need at "
        "keep + one prefill chunk.",
    ]
    result = dict(
        config=cfg,
        provenance=prov,
        environment=environment(),
        capacity=cap,
        decode=dec,
        shared_prefix=shared,
        notes=notes,
        wall_s=time.perf_counter() - t0,
    )
    print(write_results(out_dir, args.tag, result, render_md, plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
