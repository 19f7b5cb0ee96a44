"""Markdown report and plot of ``python -m loadtest.decode``."""

from __future__ import annotations

from pathlib import Path

from benchmarks import provenance


def _f(x, fmt: str, suffix: str = "") -> str:
    return "-" if x is None else format(x, fmt) + suffix


def _metric_name(key: str) -> str:
    return {
        "output_tokens_per_s_ratio": "output tokens/s vs stock",
        "mean_running_ratio": "mean running vs stock",
        "peak_running_ratio": "peak running vs stock",
        "eviction_share_decode": "eviction time / decode-step time, decode steady state",
    }.get(key, key)


def targets_md(rows: list[dict]) -> list[str]:
    out = []
    for t in rows:
        share = t["metric"] == "eviction_share_decode"
        value = (
            _f(None if t["value"] is None else 100 * t["value"], ".1f", "%")
            if share
            else _f(t["value"], ".2f", "x")
        )
        want = f"<= {100 * t['target']:.0f}%" if share else f">= {t['target']:g}x"
        out.append(
            f"- {t['config']}: {_metric_name(t['metric'])} {value} (target {want}): "
            + ("**met**" if t["met"] else "**missed**")
        )
    return out


def render_md(r: dict) -> str:
    configs = r["configs"]
    holds = r["pool_holds"]
    ppl = (r.get("ppl") or {}).get("rows", {})
    lines = [
        "# Decode-heavy load test (real OpenAI server, long generations sent at once)",
        "",
        *provenance.markdown(r, " (quick preset)" if r.get("quick") else ""),
    ]
    if r.get("server_cmd"):
        lines += [f"Server: `{' '.join(r['server_cmd'])}`", ""]
    budgeted = [c for c in configs if c["budget"]]
    lines += [
        f"{r['requests']} streaming completions per configuration, each a KJV passage of its own "
        f"({r['prompt_tokens']} prompt tokens) generating {r['output_tokens']} tokens "
        f"(ignore_eos), all sent at once into a pool of {r['pool_blocks']} blocks of "
        f"{r['block_size']} tokens. Budgets at "
        + ", ".join(f"{c['compression']:g}x" for c in budgeted)
        + f" compression of the final {r['sequence_tokens']}-token sequence, policy "
        f"`{r['policy']}` (a budget keeps whole blocks, `kept`, and a request holds at most "
        "kept / block + slack / block blocks, its cap). At their caps the pool holds "
        + ", ".join(f"{holds[k]} {k}" for k in holds)
        + " requests. Ratios against stock in the same run; the machine's 2 cores are shared, "
        "so absolute rates are noisy and the ratios are what this measures.",
        "",
        "| config | budget (kept) | output tok/s | vs stock | req/s | vs stock | peak running "
        "| mean running | vs stock | TPOT p50 / p99 (ms) | TTFT p50 / p99 (s) | preemptions "
        "| recomputed tokens (budgeted) | eviction time: run / decode steady state | ppl | vs full | errors |",
        "|" + "---|" * 17,
    ]
    for c in configs:
        d = c["decode"]
        p = ppl.get(c["label"], {})
        budget = f"{c['budget']} ({c['keep']})" if c["budget"] else "-"
        share = (
            f"{100 * c['eviction_share']:.1f}% / "
            + _f(None if "eviction_share" not in d else 100 * d["eviction_share"], ".1f", "%")
            if c["budget"]
            else "-"
        )
        lines.append(
            f"| {c['label']} | {budget} | {c['output_tokens_per_s']:.1f} | "
            f"{_f(c['output_tokens_per_s_ratio'], '.2f', 'x')} | {c['requests_per_s']:.3f} | "
            f"{_f(c['requests_per_s_ratio'], '.2f', 'x')} | {c['peak_running']:.0f} | "
            f"{c['mean_running']:.1f} | {_f(c['mean_running_ratio'], '.2f', 'x')} | "
            f"{_f(c['tpot_p50_ms'], '.0f')} / {_f(c['tpot_p99_ms'], '.0f')} | "
            f"{_f(c['ttft_p50_s'], '.1f')} / {_f(c['ttft_p99_s'], '.1f')} | "
            f"{c['preemptions']:.0f} | {_f(c.get('recomputed_tokens') if c['budget'] else None, '.0f')} | {share} | {_f(p.get('ppl'), '.2f')} | "
            f"{_f(p.get('ppl_ratio'), '.3f', 'x')} | {c['errors']} |"
        )
    lines += [
        "",
        "Engine time by part. The engine is never idle during a configuration, so wall time "
        "between two `/metrics` polls is engine (step) time. *Decode steady state*: the poll "
        "intervals in which only decode steps ran while requests waited (the same requests "
        "running throughout, each producing one token per step), i.e. decode-step time with the "
        "pool, not the request count, limiting concurrency. *Middle half*: the middle half of "
        "the configuration's wall time, prefills included. Eviction time is the increase of "
        "`vllm_caote:eviction_seconds_sum` (scoring + compaction, timed in the worker); steps "
        "are `vllm:iteration_tokens_total_count`.",
        "",
        "| config | part | seconds | mean running | output tok/s | vs stock | step (ms) "
        "| eviction per step (ms) | evictions | eviction share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        for part, name in (("decode", "decode steady state"), ("middle", "middle half")):
            st = c[part]
            lines.append(
                f"| {c['label']} | {name} | {st['seconds']:.0f} | "
                f"{_f(st.get('mean_running'), '.1f')} | "
                f"{_f(st.get('output_tokens_per_s'), '.1f')} | "
                f"{_f(st.get('output_tokens_per_s_ratio'), '.2f', 'x')} | "
                f"{_f(st.get('step_ms'), '.0f')} | "
                f"{_f(st.get('eviction_ms_per_step'), '.2f')} | "
                f"{_f(st.get('evictions'), '.0f')} | "
                + _f(None if "eviction_share" not in st else 100 * st["eviction_share"], ".1f", "%")
                + " |"
            )
    hits = sum(c["prefix_cache_hits"] for c in configs)
    lines += ["", f"Prefix-cache hits over all configurations: {hits:.0f} tokens.", ""]
    q = r.get("ppl")
    if q:
        lines += [
            "## Quality at the same budgets: block-wise perplexity on KJV continuations",
            "",
            f"`{q['command']}`: {q['passages']} KJV passages of {q['context']} tokens (the "
            f"final sequence length), teacher-forced through the in-process engine with the "
            f"same policy, budgets and block size, block-wise prefill in chunks of "
            f"{q['chunk']} tokens: every chunk is scored against a cache evicted back to "
            f"`kept`, as each block of decoded tokens is. {q['tokens_scored']} tokens scored "
            "per cell. `tail` = tokens after the first chunk (the ones eviction can reach).",
            "",
            "| config | budget | ppl | vs full cache | ppl tail | vs full cache |",
            "|---|---|---|---|---|---|",
        ]
        for label, p in q["rows"].items():
            lines.append(
                f"| {label} | {p['budget'] or 'full cache'} | {p['ppl']:.2f} | "
                f"{_f(p.get('ppl_ratio'), '.3f', 'x')} | {_f(p['ppl_tail'], '.2f')} | "
                f"{_f(p.get('ppl_tail_ratio'), '.3f', 'x')} |"
            )
        lines.append("")
    lines += ["## Targets (issue #20)", ""] + targets_md(r.get("targets", [])) + [""]
    lines += [f"Total wall time {r['wall_s']:.0f} s.", ""]
    if r.get("plots"):
        lines += [f"![throughput and concurrency vs budget]({Path(p).name})" for p in r["plots"]]
        lines.append("")
    return "\n".join(lines)


def plot(r: dict, out_dir: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = r["configs"]
    seq = r["sequence_tokens"]
    ppl = (r.get("ppl") or {}).get("rows", {})
    x = [c["keep"] or seq for c in configs]
    fig, axes = plt.subplots(1, 2 if ppl else 1, figsize=(11 if ppl else 6.5, 4.5), squeeze=False)
    ax = axes[0][0]
    tps = [c["output_tokens_per_s"] for c in configs]
    ax.plot(x, tps, "-o", color="tab:red", label="output tokens/s")
    ax.scatter([x[0]], [tps[0]], marker="*", s=250, color="black", zorder=5, label="stock vLLM")
    for xi, c in zip(x, configs, strict=True):
        ax.annotate(c["label"], (xi, c["output_tokens_per_s"]), xytext=(4, 6),
                    textcoords="offset points", fontsize=8)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel("KV tokens kept per request (budget in whole blocks; stock = full sequence)")
    ax.set_ylabel("output tokens/s", color="tab:red")
    ax.set_ylim(0, max(tps) * 1.25)
    ax2 = ax.twinx()
    ax2.plot(x, [c["peak_running"] for c in configs], "--s", color="tab:blue", label="peak running")
    ax2.plot(x, [c["mean_running"] for c in configs], ":^", color="tab:blue", label="mean running")
    ax2.set_ylabel("requests running at once", color="tab:blue")
    ax2.set_ylim(0, max(c["peak_running"] for c in configs) * 1.25 + 1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    ax.set_title(f"{r['requests']} x ({r['prompt_tokens']} + {r['output_tokens']}) tokens at "
                 f"once, {r['pool_blocks']}-block pool", fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3)
    if ppl:
        bx = axes[0][1]
        px = [ppl[c["label"]]["budget"] and c["keep"] or seq for c in configs if c["label"] in ppl]
        py = [ppl[c["label"]]["ppl"] for c in configs if c["label"] in ppl]
        bx.plot(px, py, "-o", color="tab:green")
        bx.scatter([seq], [ppl["stock"]["ppl"]], marker="*", s=250, color="black", zorder=5,
                   label="full cache")  # fmt: skip
        bx.set_xscale("log", base=2)
        bx.set_xticks(px, [str(v) for v in px])
        bx.set_xlabel("KV tokens kept per request")
        bx.set_ylabel(f"KJV perplexity ({r['policy']}, block-wise)")
        bx.set_title(f"quality at the same budgets ({r['ppl']['context']}-token passages)",
                     fontsize=10)  # fmt: skip
        bx.grid(alpha=0.3)
        bx.legend(fontsize=8)
    path = Path(out_dir) / f"{stem}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [str(path)]
