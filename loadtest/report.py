"""The load test's Markdown report."""

from __future__ import annotations

import json

from benchmarks import provenance


def render_md(r: dict) -> str:
    lines = [
        "# vllm-caote load test (real OpenAI server, streaming completions)",
        "",
        *provenance.markdown(r),
    ]
    if r.get("server_cmd"):
        lines += [f"Server: `{' '.join(r['server_cmd'])}` (env {json.dumps(r['server_env'])})", ""]
    m = r.get("mixed")
    if m:

        def f(x, fmt):
            return "-" if x is None else format(x, fmt)

        lines += [
            "## Mixed budgets",
            "",
            f"{m['requests']} requests ({m['prompt_tokens_each']} prompt tokens, "
            f"{m['output_tokens_each']} output tokens, ignore_eos), concurrency "
            f"{m['concurrency']}, budgets `{r['budgets']}` (policy {r['policy']}); "
            f"wall {m['wall_s']:.0f} s; {m['errors']} errors, "
            f"{m['cancelled_at_time_limit']} cancelled at the time limit.",
            "",
            f"Throughput: {m['throughput_req_s']:.3f} req/s, "
            f"{m['throughput_out_tok_s']:.2f} output tok/s, "
            f"{m['throughput_total_tok_s']:.1f} total tok/s.",
            "",
            "| budget | ok | errors | TTFT p50 (s) | TTFT p99 (s) | TPOT p50 (ms) | "
            "TPOT p99 (ms) |",
            "|---|---|---|---|---|---|---|",
        ]
        rows = [("all", m)] + list(m["by_budget"].items())
        for name, s in rows:
            lines.append(
                f"| {name} | {s['ok']} | {s['errors']} | {f(s['ttft_p50_s'], '.2f')} | "
                f"{f(s['ttft_p99_s'], '.2f')} | {f(s['tpot_p50_ms'], '.1f')} | "
                f"{f(s['tpot_p99_ms'], '.1f')} |"
            )
        lines.append("")
    c = r.get("capacity")
    if c:
        lines += [
            "## Capacity (same KV pool)",
            "",
            f"{c['requests']} requests of {c['prompt_tokens']} prompt tokens sent at once; "
            f"`vllm:num_requests_running` polled from /metrics every 0.25 s for at most "
            f"{c['seconds_per_phase']:.0f} s per phase.",
            "",
            "| | no kv_budget | kv_budget " + str(c["budgeted"]["budget"]) + " | ratio |",
            "|---|---|---|---|",
            f"| max running | {c['stock']['max_running']:.0f} | "
            f"{c['budgeted']['max_running']:.0f} | **{c['ratio_max_running']:.2f}x** |",
            f"| mean running | {c['stock']['mean_running']:.2f} | "
            f"{c['budgeted']['mean_running']:.2f} | |",
            f"| max waiting | {c['stock']['max_waiting']:.0f} | "
            f"{c['budgeted']['max_waiting']:.0f} | |",
            "",
        ]
    t = r.get("throughput")
    if t:
        lines += [
            "## Throughput: the same requests run to completion, stock vs budgets",
            "",
            f"{t['requests']} requests of {t['prompt_tokens']} prompt tokens sent at once.",
            "",
            "| | budget | requests/s | output tokens/s | TTFT p50 (s) | errors | vs stock |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for label in ("stock", "4x", "8x"):
            x = t[label]
            ratio = f"{x['throughput_ratio']:.2f}x" if "throughput_ratio" in x else ""
            lines.append(
                f"| {label} | {x['budget'] or '-'} | {x['requests_per_s']:.3f} | "
                f"{x['output_tokens_per_s']:.2f} | {x['ttft_p50_s'] or 0:.1f} | {x['errors']} | "
                f"{ratio} |"
            )
        lines.append("")
    room = r.get("room")
    if room:
        st, bx = room["stock"], room["4x"]
        lines += [
            "## Time to first token with room in the pool",
            "",
            f"{room['pairs']} pairs of {room['prompt_tokens']}-token prompts sent one at a time, "
            f"alternating no budget and kv_budget {bx['budget']} (adaptive prefill).",
            "",
            "| | TTFT p50 (s) | TTFT p99 (s) | errors |",
            "| --- | --- | --- | --- |",
            f"| no kv_budget | {st['ttft_p50_s'] or 0:.2f} | {st['ttft_p99_s'] or 0:.2f} | "
            f"{st['errors']} |",
            f"| kv_budget {bx['budget']} | {bx['ttft_p50_s'] or 0:.2f} | "
            f"{bx['ttft_p99_s'] or 0:.2f} | {bx['errors']} |",
            f"| ratio | **{room['ttft_p50_ratio']:.2f}x** | | |",
            "",
        ]
    return "\n".join(lines)
