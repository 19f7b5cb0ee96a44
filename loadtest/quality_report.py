"""Markdown table and plot of ``python -m loadtest.quality``."""

from __future__ import annotations

from pathlib import Path

from benchmarks import provenance


def _pct(k: int, n: int) -> str:
    return f"{k}/{n}"


def render_md(r: dict) -> str:
    cells = r["cells"]
    stock = cells[0]
    phrasings = sorted({p for c in cells for p in c["by_phrasing"]})
    haystacks = sorted({h for c in cells for h in c["by_haystack"]})
    lines = [
        "# Quality at capacity (real OpenAI server, prompts sent at once)",
        "",
        *provenance.markdown(r),
    ]
    if r.get("server_cmd"):
        lines += [f"Server: `{' '.join(r['server_cmd'])}`", ""]
    lines += [
        f"{r['requests']} prompts of ~{r['prompt_tokens_mean']:.0f} tokens per cell "
        f"({', '.join(r['tasks'])}; phrasings {', '.join(phrasings)}; haystacks "
        f"{', '.join(haystacks)}), all sent at once; budgets as fractions "
        f"{r['fractions']} of the context. Ratios against the full cache (stock vLLM) in the "
        "same run. Wilson 95% intervals.",
        "",
        "| policy | budget | correct | 95% CI | "
        + " | ".join(f"{p}" for p in phrasings)
        + " | "
        + " | ".join(haystacks)
        + " | peak running | mean running | req/s vs stock | TTFT p50 (s) | TTFT p50 vs stock "
        "| preemptions |",
        "|" + "---|" * (10 + len(phrasings) + len(haystacks)),
    ]
    for c in cells:
        lo, hi = c["ci95"]
        lines.append(
            f"| {c['policy']} | {c['budget'] or '-'} | {c['correct']}/{c['n']} | "
            f"[{100 * lo:.0f}, {100 * hi:.0f}] | "
            + " | ".join(_pct(*c["by_phrasing"].get(p, [0, 0])) for p in phrasings)
            + " | "
            + " | ".join(_pct(*c["by_haystack"].get(h, [0, 0])) for h in haystacks)
            + f" | {c['peak_running']:.0f} | {c['mean_running']:.1f} | "
            f"{c['requests_per_s_ratio']:.2f}x | {c['ttft_p50_s'] or 0:.1f} | "
            f"{c['ttft_p50_ratio']:.2f}x | {c['preemptions']:.0f} |"
        )
    lines += [
        "",
        f"Full cache: {stock['correct']}/{stock['n']} with at most "
        f"{stock['peak_running']:.0f} running. Total wall time {r['wall_s']:.0f} s.",
        "",
    ]
    from loadtest.shorts import render_md as shorts_md

    lines += shorts_md(r.get("shorts") or [])
    if r.get("plots"):
        lines += [f"![accuracy vs concurrency]({Path(p).name})" for p in r["plots"]] + [""]
    return "\n".join(lines)


def plot(r: dict, out_dir: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    cells = r["cells"]
    stock = cells[0]
    fractions = sorted({c["budget"] for c in cells[1:]}, reverse=True)
    markers = dict(zip(fractions, "os^vD", strict=False))
    names = list(dict.fromkeys(c["policy"] for c in cells[1:]))
    for c in cells[1:]:
        caote = c["policy"].startswith(("caote", "fast-caote"))
        # policies side by side at their shared concurrency, so equal points stay readable
        x = c["peak_running"] + 0.18 * (names.index(c["policy"]) - (len(names) - 1) / 2)
        ax.scatter(x, 100 * c["accuracy"], marker=markers.get(c["budget"], "o"),
                   color="tab:red" if caote else "tab:blue", s=45, alpha=0.85)  # fmt: skip
        ax.annotate(c["policy"], (x, 100 * c["accuracy"]), fontsize=6, rotation=60,
                    xytext=(0, 5), textcoords="offset points", ha="left")  # fmt: skip
    for budget, m in markers.items():
        ax.scatter([], [], marker=m, color="gray", label=f"budget {budget} tokens")
    ax.scatter(stock["peak_running"], 100 * stock["accuracy"], marker="*", s=220, color="black",
               label="full cache (stock vLLM)", zorder=5)  # fmt: skip
    ax.scatter([], [], color="tab:red", label="CAOTE policies")
    ax.scatter([], [], color="tab:blue", label="base policies")
    ax.set_xlabel("peak requests running at once (vllm:num_requests_running)")
    ax.set_ylabel(f"retrieval accuracy, % of {stock['n']} prompts")
    ax.set_ylim(-5, 115)
    ax.set_title(f"{r['requests']} prompts of ~{r['prompt_tokens_mean']:.0f} tokens at once")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    path = Path(out_dir) / f"{stem}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [str(path)]
