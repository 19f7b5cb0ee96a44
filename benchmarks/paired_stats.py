"""Paired statistics and the report of :mod:`benchmarks.paired`.

Invariants: every comparison is paired (the same prompts under both policies); an interval is a
95% percentile interval of the paired bootstrap over prompts (fixed seed, so a report is
reproducible), beside the t-style ``mean +- 1.96 * sd / sqrt(n)``; McNemar counts are the
prompts only one of the two policies answered right, with the exact two-sided binomial p.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

#: (meta prefix, label) of the CAOTE forms compared with their base
METAS = (("caote-", "CAOTE"), ("fast-caote-", "FastCAOTE"))


def paired_diff(a, b, reps: int = 4000, seed: int = 0) -> dict:
    """``a - b`` per prompt: mean, bootstrap 95% interval, normal-approximation interval."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    if n == 0:
        return {"n": 0}
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, n, size=(reps, n))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    half = 1.959964 * sd / math.sqrt(n)
    return {
        "n": n,
        "mean": mean,
        "ci": [float(lo), float(hi)],
        "ci_t": [mean - half, mean + half],
        "sd": sd,
        "significant": bool(lo > 0 or hi < 0),
    }


def mcnemar(a, b) -> dict:
    """Paired 0/1 outcomes: ``a_only`` (a right, b wrong), ``b_only``, exact two-sided p."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
    k, m = min(n01, n10), n01 + n10
    p = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2**m)
    return {"a_only": n01, "b_only": n10, "both": int((a & b).sum()), "p": p}


def summarize(rows: list[dict], bases: list[str]) -> dict:
    """Per (kind, mode, budget): each policy's mean score and accuracy, and CAOTE-X - X,
    FastCAOTE-X - X, CAOTE's paper form (``caote-X+paper``) - CAOTE-X and - X, and (language
    modelling) each policy - StreamingLLM, paired."""
    cells: dict = {}
    for r in rows:
        key = (r["kind"], r["mode"], r["budget"])
        cells.setdefault(key, {}).setdefault(r["policy"], {})[r["case"]] = r
    out = []
    for (kind, mode, budget), pols in sorted(cells.items(), key=lambda kv: str(kv[0])):
        cell = {"kind": kind, "mode": mode, "budget": budget, "policies": {}, "pairs": []}
        for name, by_case in pols.items():
            sc = [x["score"] for x in by_case.values()]
            ok = [x["correct"] for x in by_case.values()]
            cell["policies"][name] = {"n": len(sc), "score": float(np.mean(sc)), "acc": float(np.mean(ok))}  # fmt: skip
        refs = [(p + b, b, lab) for b in bases for p, lab in METAS]
        refs += [(p, p[:-4], "segments") for p in pols if p.endswith("+seg")]
        for p in pols:  # CAOTE's paper form (caote-X+paper) vs CAOTE-X and vs X
            if p.endswith("+paper"):
                refs += [(p, p[:-6], "paper form vs base alpha"), (p, p[:-6].split("caote-", 1)[1], "paper-form CAOTE")]  # fmt: skip
        # a harness selection override (X@r0.5, X@f4: benchmarks.paired) vs X's plain top-k
        refs += [(p, p.split("@", 1)[0], "selection override") for p in pols if "@" in p]
        if kind == "lm":
            refs += [(p, "streaming", "vs StreamingLLM") for p in pols if p not in ("streaming", "full")]  # fmt: skip
        for a, b, label in refs:
            if a not in pols or b not in pols:
                continue
            common = sorted(set(pols[a]) & set(pols[b]))
            sa = [pols[a][c]["score"] for c in common]
            sb = [pols[b][c]["score"] for c in common]
            pair = {"a": a, "b": b, "label": label, "score": paired_diff(sa, sb)}
            if kind == "retrieval":
                ca = [pols[a][c]["correct"] for c in common]
                cb = [pols[b][c]["correct"] for c in common]
                pair["mcnemar"] = mcnemar(ca, cb)
            else:
                ca = [pols[a][c]["correct"] for c in common]
                cb = [pols[b][c]["correct"] for c in common]
                pair["acc"] = paired_diff(ca, cb)
            cell["pairs"].append(pair)
        out.append(cell)
    return {"cells": out}


def _lookalike(cfg: dict) -> str:
    """The look-alike prompts among the retrieval ones, if any."""
    if not cfg.get("lookalike"):
        return ""
    return (
        f"; look-alike prompts asked for: {cfg['lookalike']} ({cfg['lookalike_pairs']} key-value sentences "
        f"each, after the suite's); X+seg: segments of at most {cfg['segment_len']} tokens"
    )


def _ci(s: dict, digits: int = 3) -> str:
    if not s.get("n"):
        return "-"
    star = " *" if s["significant"] else ""
    lo, hi = s["ci"]
    return f"{s['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{star}"


def render_md(result: dict) -> str:
    from benchmarks import provenance

    cfg = result["config"]
    lines = [
        f"# Paired comparison: CAOTE-X vs X ({result['tag']})",
        "",
        *provenance.markdown(result),
        f"Device: {result['device']}; wall: {result['wall_s']:.0f} s",
        "",
        f"Prompts: {cfg['retrieval']} retrieval (passkey + multi-key, {cfg['context']}-token "
        f"haystacks, seed {cfg['seed']}{_lookalike(cfg)}), {cfg['lm']} KJV continuations ({cfg['context']} "
        f"tokens, next {cfg['lm_tokens']} scored); block-wise: "
        f"{cfg.get('blockwise_prompts', 0)} prompts, chunk {cfg['chunk']}. Budgets: fractions of each prompt, rounded up to "
        f"{cfg['block_size']}-token blocks; sinks {cfg['sinks']}, window {cfg['window']}, "
        f"recent share {cfg.get('recent', 0.0)}.",
        "",
        "Score: retrieval = log-probability of the answer's tokens (sum), teacher-forced after "
        "the prompt; language modelling = mean log-probability of the next tokens. Accuracy: "
        "retrieval = every answer token after the first is the greedy choice (the engine reads "
        "the first from the full-cache prefill: the same under every policy); LM = share of "
        "greedy hits. "
        "Differences are paired per prompt, mean [bootstrap 95% interval]; * = the interval "
        "excludes 0. McNemar: prompts only A / only B answered.",
        "",
    ]
    lines += [f"Note: {n}" for n in result.get("notes", [])] + [""] * bool(result.get("notes"))
    for cell in result["summary"]["cells"]:
        kind, mode, budget = cell["kind"], cell["mode"], cell["budget"]
        lines += [f"## {kind}, {mode}, budget {budget:g}", ""]
        pol = cell["policies"]
        order = sorted(pol, key=lambda p: -pol[p]["score"])
        lines += ["| policy | n | mean score | accuracy |", "| --- | --- | --- | --- |"]
        lines += [f"| {p} | {pol[p]['n']} | {pol[p]['score']:.4f} | {pol[p]['acc']:.3f} |" for p in order]  # fmt: skip
        lines += ["", "| A | B | A - B score | A - B accuracy |", "| --- | --- | --- | --- |"]
        for pr in cell["pairs"]:
            if "mcnemar" in pr:
                mc = pr["mcnemar"]
                acc = f"only A {mc['a_only']}, only B {mc['b_only']} (p={mc['p']:.2g})"
            else:
                acc = _ci(pr["acc"])
            lines.append(f"| {pr['a']} | {pr['b']} | {_ci(pr['score'])} | {acc} |")
        lines.append("")
    return "\n".join(lines)


#: pair labels plotted as one series per policy across budgets (:func:`plot`)
SERIES_LABELS = ("vs StreamingLLM", "selection override")


def _series_panel(ax, key, pts, colors: dict) -> None:
    kind, mode, label = key
    budgets = sorted({f for _, f, _ in pts})
    names = sorted({a for a, _, _ in pts})
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        sel = sorted((f, sc) for a, f, sc in pts if a == name)
        x = [budgets.index(f) + (j - (len(names) - 1) / 2) * width for f, _ in sel]
        y = [sc["mean"] for _, sc in sel]
        err = [[sc["mean"] - sc["ci"][0] for _, sc in sel], [sc["ci"][1] - sc["mean"] for _, sc in sel]]  # fmt: skip
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=name, color=colors[name])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(budgets)), [f"budget {f:g}" for f in budgets], fontsize=8)
    unit = "answer log-prob (sum)" if kind == "retrieval" else "mean log-prob / token"
    ref = "StreamingLLM" if label == "vs StreamingLLM" else "the plain top-k"
    ax.set_ylabel(f"diff, {unit}", fontsize=8)
    ax.set_title(f"{kind}, {mode}: policy minus {ref}, 95% bootstrap interval", fontsize=9)
    ax.legend(fontsize=7, ncol=3)


def plot(result: dict, out_dir: Path, tag: str) -> list[str]:
    """One panel per (kind, mode): CAOTE-X - X and FastCAOTE-X - X with intervals, per base
    and budget; then one per (kind, mode) of each policy - StreamingLLM (language modelling)
    and of each @-override - its plain top-k, a series per policy across budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict = {}
    for cell in result["summary"]["cells"]:
        for pr in cell["pairs"]:
            if pr["label"] in dict(METAS).values() and pr["score"].get("n"):
                key = (cell["kind"], cell["mode"])
                panels.setdefault(key, []).append((pr["b"], cell["budget"], pr["label"], pr["score"]))  # fmt: skip
    # each policy - StreamingLLM (language modelling) and each @-override - its plain top-k:
    # one series per policy across the budgets
    series: dict = {}
    for cell in result["summary"]["cells"]:
        for pr in cell["pairs"]:
            if pr["label"] in SERIES_LABELS and pr["score"].get("n"):
                key = (cell["kind"], cell["mode"], pr["label"])
                series.setdefault(key, []).append((pr["a"], cell["budget"], pr["score"]))
    if not panels and not series:
        return []
    rows = len(panels) + len(series)
    fig, axes = plt.subplots(rows, 1, figsize=(11, 3.2 * rows), squeeze=False)
    names = sorted({a for pts in series.values() for a, _, _ in pts})
    colors = {n: plt.get_cmap("tab10" if len(names) <= 10 else "tab20")(i) for i, n in enumerate(names)}  # fmt: skip
    for ax, (key, pts) in zip(axes[len(panels) :, 0], sorted(series.items()), strict=True):
        _series_panel(ax, key, pts, colors)
    for ax, ((kind, mode), pts) in zip(axes[:, 0], sorted(panels.items()), strict=False):
        xs = sorted({(b, f) for b, f, _, _ in pts})
        pos = {x: i for i, x in enumerate(xs)}
        for j, (_, label) in enumerate(METAS):
            sel = [p for p in pts if p[2] == label]
            x = [pos[(b, f)] + (j - 0.5) * 0.25 for b, f, _, _ in sel]
            y = [s["mean"] for *_, s in sel]
            err = [[s["mean"] - s["ci"][0] for *_, s in sel], [s["ci"][1] - s["mean"] for *_, s in sel]]  # fmt: skip
            ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=f"{label}-X minus X")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(
            range(len(xs)),
            [f"{b.replace('expected-attention', 'exp.-att.')}\n{f:g}" for b, f in xs],
            fontsize=7,
        )
        unit = "answer log-prob (sum)" if kind == "retrieval" else "mean log-prob / token"
        ax.set_ylabel(f"diff, {unit}", fontsize=8)
        ax.set_title(f"{kind}, {mode}: paired difference, 95% bootstrap interval", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / f"{tag}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]
