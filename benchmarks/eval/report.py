"""The eval's report: summary per task / policy / budget, the quality targets, Markdown and
plots. Plots need matplotlib (the ``bench`` extra); the JSON never does."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from benchmarks import provenance
from benchmarks.eval.common import wilson
from benchmarks.eval.tasks import CAOTE_PAIRS, FULL

#: tasks scored as exact-answer accuracy
ACCURACY_TASKS = ("passkey", "multikey")


def summarize(rows: list[dict]) -> dict:
    """{task: {policy: {budget_label: metrics}}} pooled over contexts, depths, samples."""
    out: dict = {"passkey": {}, "multikey": {}, "ppl": {}, "longbench": {}}
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["task"], r["policy"], r["budget_label"]), []).append(r)
    for (task, pol, label), rs in sorted(groups.items()):
        ev = [r["kv_eviction"]["evicted_tokens"] for r in rs if r.get("kv_eviction")]
        common = dict(
            n=len(rs),
            budgets=sorted({r["budget"] for r in rs if r["budget"]}),
            clamped=any(r["clamped"] for r in rs),
            mean_evicted_tokens=statistics.fmean(ev) if ev else 0.0,
        )
        if task in ACCURACY_TASKS:
            k = sum(r["correct"] for r in rs)
            lo, hi = wilson(k, len(rs))
            by_ctx = {}
            for r in rs:
                by_ctx.setdefault(str(r["context"]), []).append(r["correct"])
            cell = dict(
                common,
                correct=k,
                accuracy=k / len(rs),
                ci95=[lo, hi],
                accuracy_by_context={c: sum(v) / len(v) for c, v in by_ctx.items()},
            )
            for key in ("phrasing", "haystack"):  # the retrieval suite's breakdowns
                groups_k: dict = {}
                for r in rs:
                    if key in r:
                        groups_k.setdefault(r[key], []).append(r["correct"])
                if groups_k:
                    cell[f"correct_by_{key}"] = {g: [sum(v), len(v)] for g, v in groups_k.items()}
        elif task == "longbench":
            f1 = [r["f1"] for r in rs]
            mean = statistics.fmean(f1)
            half = 1.96 * statistics.stdev(f1) / math.sqrt(len(f1)) if len(f1) > 1 else 1.0
            by_set: dict = {}
            for r in rs:
                by_set.setdefault(r["dataset"], []).append(r["f1"])
            cell = dict(
                common,
                f1=mean,
                ci95=[max(0.0, mean - half), min(1.0, mean + half)],
                f1_by_dataset={k: statistics.fmean(v) for k, v in by_set.items()},
            )
        else:
            s, n = sum(r["nll_sum"] for r in rs), sum(r["nll_n"] for r in rs)
            st, nt = sum(r["nll_tail_sum"] for r in rs), sum(r["nll_tail_n"] for r in rs)
            cell = dict(
                common,
                ppl=math.exp(s / n),
                ppl_tail=math.exp(st / nt) if nt else None,
                tokens_scored=n,
            )
        out[task].setdefault(pol, {})[label] = cell
    return out


def targets(summary: dict, labels: list[str]) -> dict:
    """The issue's quality targets, checked on the measured summary."""
    res: dict = {}
    pk = summary.get("passkey") or {}
    full = pk.get(FULL, {}).get(FULL)
    quarter = "0.25" if "0.25" in labels else None
    if full and quarter:
        caote = {p: c[quarter]["accuracy"] for p, c in pk.items() if "caote" in p and quarter in c}
        if caote:
            best = max(caote, key=caote.get)
            gap = (full["accuracy"] - caote[best]) * 100
            res["passkey_25pct_best_caote"] = dict(
                policy=best,
                accuracy=caote[best],
                full_accuracy=full["accuracy"],
                gap_points=gap,
                met=gap <= 5.0,
            )
    comp = []
    for c, base in CAOTE_PAIRS:
        for label in labels:
            if label == FULL:
                continue
            row = dict(caote=c, base=base, budget=label)
            for task in ACCURACY_TASKS:
                acc = summary.get(task) or {}
                if c in acc and base in acc and label in acc[c] and label in acc[base]:
                    row[task] = [acc[c][label]["accuracy"], acc[base][label]["accuracy"]]
                    row[f"{task}_met"] = row[task][0] >= row[task][1]
            pp = summary.get("ppl") or {}
            if c in pp and base in pp and label in pp[c] and label in pp[base]:
                row["ppl"] = [pp[c][label]["ppl"], pp[base][label]["ppl"]]
                row["ppl_met"] = row["ppl"][0] <= row["ppl"][1] * 1.0001
            lb = summary.get("longbench") or {}
            if c in lb and base in lb and label in lb[c] and label in lb[base]:
                row["longbench_f1"] = [lb[c][label]["f1"], lb[base][label]["f1"]]
                row["longbench_met"] = row["longbench_f1"][0] >= row["longbench_f1"][1]
            if len(row) > 3:
                comp.append(row)
    res["caote_vs_base"] = comp
    return res


def _fmt_pct(c) -> str:
    if not c:
        return ""
    lo, hi = c["ci95"]
    return f"{100 * c['accuracy']:.0f}% [{100 * lo:.0f},{100 * hi:.0f}]"


def _fmt_f1(c) -> str:
    if not c:
        return ""
    lo, hi = c["ci95"]
    return f"{c['f1']:.3f} [{lo:.3f},{hi:.3f}]"


def _fmt_ppl(c) -> str:
    if not c:
        return ""
    tail = f" / {c['ppl_tail']:.2f}" if c.get("ppl_tail") else ""
    return f"{c['ppl']:.2f}{tail}"


def render_md(result: dict) -> str:
    cfg, summary = result["config"], result["summary"]
    labels = cfg["budget_labels"]
    lines = [
        f"# KV-eviction quality ({Path(cfg['model']).name})",
        "",
        *provenance.markdown(result),
        f"Contexts {cfg['contexts']} tokens; depths {cfg['depths']}; "
        f"{cfg['samples']} sample(s) per (context, depth); {cfg['ppl_passages']} KJV "
        f"passage(s) per context. Budget columns are fractions of the context; token "
        f"budgets per context: {json.dumps(cfg['budget_tokens'])}"
        f" (values below the engine minimum {cfg['min_budget']} are clamped to it"
        f"{': ' + ', '.join(cfg['clamped']) if cfg['clamped'] else ''}). "
        f"`full` = no kv_budget (stock vLLM). KV blocks of {cfg.get('block_size')} tokens "
        f"(a budget keeps whole blocks), block-wise prefill in chunks of "
        f"{cfg.get('prefill_chunk') or 'vLLM-sized'} tokens. Wall time {result['wall_s']:.0f} s.",
        "",
    ]
    for task, title, fmt in (
        ("passkey", "Passkey accuracy [Wilson 95% CI]", _fmt_pct),
        (
            "multikey",
            "Multi-key retrieval (RULER-style, 4 keys) accuracy [Wilson 95% CI]",
            _fmt_pct,
        ),
        (
            "ppl",
            "Perplexity (all tokens / tokens after the first "
            f"{cfg['prefill_chunk']}-token prefill chunk)",
            _fmt_ppl,
        ),
        ("longbench", "LongBench QA token F1 [95% CI]", _fmt_f1),
    ):
        tab = summary.get(task) or {}
        if not tab:
            continue
        lines += [f"## {title}", ""]
        cols = [lb for lb in labels if lb != FULL]
        full = tab.get(FULL, {}).get(FULL)
        lines.append("| policy | " + " | ".join(f"budget {c}" for c in cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        if full:
            lines.append(f"| full cache | {fmt(full)} |" + " |" * (len(cols) - 1))
        for pol in cfg["policies"]:
            if pol in tab:
                lines.append(f"| {pol} | " + " | ".join(fmt(tab[pol].get(c)) for c in cols) + " |")
        lines.append("")
        lines += _breakdown(tab, task, cfg["policies"], labels)
    t = result.get("targets") or {}
    if t:
        lines += ["## Targets", ""]
        b = t.get("passkey_25pct_best_caote")
        if b:
            lines.append(
                f"- Passkey at 25% budget, best CAOTE policy `{b['policy']}`: "
                f"{100 * b['accuracy']:.0f}% vs full cache "
                f"{100 * b['full_accuracy']:.0f}% (gap {b['gap_points']:.1f} points; "
                f"target <= 5): **{'met' if b['met'] else 'not met'}**"
            )
        for r in t.get("caote_vs_base", []):
            parts = []
            for task in ACCURACY_TASKS:
                if task in r:
                    a, b = r[task]
                    ok = ">=" if r[f"{task}_met"] else "<"
                    parts.append(f"{task} {100 * a:.0f}% vs {100 * b:.0f}% ({ok})")
            if "longbench_f1" in r:
                a, b = r["longbench_f1"]
                parts.append(
                    f"LongBench F1 {a:.3f} vs {b:.3f} ({'>=' if r['longbench_met'] else '<'})"
                )
            if "ppl" in r:
                parts.append(
                    f"ppl {r['ppl'][0]:.2f} vs {r['ppl'][1]:.2f} ({'<=' if r['ppl_met'] else '>'})"
                )
            lines.append(f"- {r['caote']} vs {r['base']} @ {r['budget']}: " + "; ".join(parts))
        lines.append("")
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def _breakdown(tab: dict, task: str, policies: list[str], labels: list[str]) -> list[str]:
    """Per needle phrasing and haystack (retrieval suite): a policy tuned to one template
    shows as one strong column."""
    keys = sorted({g for cells in tab.values() for c in cells.values()
                   for g in c.get("correct_by_phrasing", {})})  # fmt: skip
    hays = sorted({g for cells in tab.values() for c in cells.values()
                   for g in c.get("correct_by_haystack", {})})  # fmt: skip
    if not keys:
        return []
    out = [f"{task} by needle phrasing and haystack (correct / prompts):", "",
           "| policy | budget | " + " | ".join(keys + hays) + " |",
           "|---" * (2 + len(keys) + len(hays)) + "|"]  # fmt: skip
    for pol in [FULL, *policies]:
        for label in labels:
            c = tab.get(pol, {}).get(label)
            if not c:
                continue
            ph, hy = c.get("correct_by_phrasing", {}), c.get("correct_by_haystack", {})
            vals = [ph.get(k, [0, 0]) for k in keys] + [hy.get(h, [0, 0]) for h in hays]
            name = "full cache" if pol == FULL else pol
            out.append(f"| {name} | {label} | " + " | ".join(f"{a}/{b}" for a, b in vals) + " |")
    return out + [""]


_FAMILY_COLOR = {
    "snapkv": "tab:blue",
    "h2o": "tab:orange",
    "tova": "tab:green",
    "keydiff": "tab:purple",
    "streaming": "tab:gray",
}


def _line_style(policy: str) -> dict:
    """One colour per base method; solid = CAOTE, dash-dot = FastCAOTE, dashed = the base."""
    base = policy.rsplit("-", 1)[-1]
    ls = "-" if policy.startswith("caote-") else "-." if policy.startswith("fast-") else "--"
    return dict(color=_FAMILY_COLOR.get(base, "black"), ls=ls)


def plot(result: dict, out_dir: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, summary = result["config"], result["summary"]
    labels = [lb for lb in cfg["budget_labels"] if lb != FULL]
    xs = [float(lb) for lb in labels]
    files = []
    for task, key, ylabel, fname in (
        ("passkey", "accuracy", "passkey accuracy", "passkey"),
        ("multikey", "accuracy", "multi-key retrieval accuracy", "multikey"),
        ("ppl", "ppl", "perplexity (KJV)", "ppl"),
        ("longbench", "f1", "LongBench QA F1", "longbench"),
    ):
        tab = summary.get(task) or {}
        if not tab:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for pol in cfg["policies"]:
            if pol not in tab:
                continue
            ys = [tab[pol].get(lb, {}).get(key) for lb in labels]
            ax.plot(xs, ys, marker="o", ms=4, label=pol, **_line_style(pol))
        full = tab.get(FULL, {}).get(FULL)
        if full:
            ax.axhline(full[key], color="black", lw=1.2, ls=":", label="full cache")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel("KV budget (fraction of context)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs budget, {Path(cfg['model']).name}, ctx {cfg['contexts']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / f"{stem}_{fname}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    return files
