"""``python -m benchmarks.needle_trace``: where a needle survives eviction, per layer.

A diagnostic, not a score. The retrieval suite's prompts (:func:`benchmarks.tasks.
retrieval_suite`) run through an in-process engine with the plugin loaded, once per prefill
setting (``--modes``, e.g. ``blockwise:keydiff`` = ``prefill: blockwise`` with ``prefill_base:
keydiff``; ``oneshot`` = the whole prompt in view). Every selection the worker makes is followed
in true token positions, so after the prompt (and the few answer tokens) the trace knows, per
request, layer and KV head, which prompt tokens the cache still holds. It reports per prompt:
the answer, the share of KV heads that hold *every* token of the key (overall and per layer),
and how the kept tokens split over the prompt's block-wise chunks.

The trace reads the worker's selections through the engine's read-only seam
(:mod:`vllm_caote.engine.observe`), so it needs the engine core in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as every in-process bench here) and changes nothing the
engine computes.

Results: ``benchmarks/results/<tag>.{json,md,png}`` (the PNG: a heat map per mode, prompts x layers,
the share of KV heads holding the key).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks import provenance


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.needle_trace", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--policy", default="caote-snapkv")
    p.add_argument("--modes", default="oneshot,blockwise:keydiff,blockwise:own",
                   help="prefill[:prefill_base] settings, one engine each")  # fmt: skip
    p.add_argument("--fraction", type=float, default=0.25, help="budget, fraction of context")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--context-tokens", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--out", help="output folder (default benchmarks/results/<tag>/)")
    p.add_argument("--tag", default="needle_trace")
    return p.parse_args(argv)


@contextlib.contextmanager
def kept_positions():
    """Yields ``{(request_id, layer): LongTensor [Hkv, kept]}``: the true positions each KV
    head holds after the last eviction seen (``None`` where the trace lost track). Reads the
    worker's selections through :mod:`vllm_caote.engine.observe`; computes nothing in it."""
    from vllm_caote.engine import observe

    held: dict[tuple[str, str], torch.Tensor | None] = {}
    since: dict[tuple[str, str], tuple[torch.Tensor, int]] = {}

    def follow(sel: observe.Selection) -> None:
        key = (sel.req_id, sel.layer)
        heads = sel.keep_idx.shape[0]
        prev, upto = since.get(key, (torch.zeros(heads, 0, dtype=torch.long), 0))
        # the cache: what the last eviction kept, then every token computed since, in order
        full = torch.cat([prev, torch.arange(upto, sel.total).expand(heads, -1)], 1)
        if full.shape[1] != sel.cache_len:  # e.g. a preempted request, recomputed
            held[key] = None  # lost: reported, never raised into the engine
            since.pop(key, None)
            return
        kept = torch.gather(full, 1, sel.keep_idx.cpu())
        held[key], since[key] = kept, (kept, sel.total)

    with observe.selections(follow):
        yield held


def _layer_index(name: str) -> int:
    digits = [int(p) for p in name.replace(".", " ").split() if p.isdigit()]
    return digits[0] if digits else -1


def trace_mode(mode: str, args, cases) -> dict:
    from benchmarks.eval.common import close_llm, make_llm, sampling
    from vllm_caote.config import settings
    from vllm_caote.engine.plan import blockwise_edges

    prefill, _, base = mode.partition(":")
    section = {"prefill": prefill, "prefill_base": base or "own"}
    llm = make_llm(None, enable_prefix_caching=False,
                   additional_config={"kv_eviction": section})  # fmt: skip
    try:
        tok = llm.get_tokenizer()
        bs = llm.llm_engine.vllm_config.cache_config.block_size
        s = settings(llm.llm_engine.vllm_config)
        prompts, keys, lengths = [], [], []
        for c in cases:
            ids = tok.encode(c.prompt, add_special_tokens=False)
            kid = tok.encode(c.answer, add_special_tokens=False)
            at = next(i for i in range(len(ids)) if ids[i : i + len(kid)] == kid)
            keys.append(list(range(at, at + len(kid))))
            prompts.append({"prompt_token_ids": ids})
            lengths.append(len(ids))
        budget = int(args.context_tokens * args.fraction)
        keep = -(-budget // bs) * bs
        with kept_positions() as held:
            t0 = time.perf_counter()
            outs = llm.generate(
                prompts,
                [sampling(args.max_tokens, budget=budget, policy=args.policy) for _ in prompts],
                use_tqdm=False,
            )
            wall = time.perf_counter() - t0
        by_req: dict[str, dict[str, torch.Tensor | None]] = defaultdict(dict)
        for (rid, name), pos in held.items():
            by_req[rid][name] = pos
        rows = []
        for c, key, n_tok, out in zip(cases, keys, lengths, outs, strict=True):
            rid = next((r for r in by_req if r == out.request_id
                        or r.startswith(out.request_id + "-")), None)  # fmt: skip
            traced = by_req.get(rid, {})
            lost = sorted(name for name, p in traced.items() if p is None)
            layers = sorted(
                ((n, p) for n, p in traced.items() if p is not None),
                key=lambda kv: _layer_index(kv[0]),
            )
            per_layer = [
                torch.stack([(p == q).any(1) for q in key]).all(0).float().mean().item()
                for _, p in layers
            ]
            # the block-wise chunks as the scheduler cuts them (the last holds the question)
            edges = blockwise_edges(n_tok, keep, s.prefill_chunk)
            flat = torch.cat([p.flatten() for _, p in layers]) if layers else torch.zeros(0)
            split = [
                ((flat >= a) & (flat < b)).float().mean().item() if flat.numel() else 0.0
                for a, b in zip(edges, edges[1:], strict=False)
            ]
            text = out.outputs[0].text
            rows.append(dict(
                phrasing=c.phrasing, haystack=c.haystack, depth=c.depth, key_at=key[0],
                prompt_tokens=n_tok, correct=c.answer in text, text=text.strip()[:40],
                evicted=bool(traced), lost_layers=lost,
                heads_with_key=sum(per_layer) / len(per_layer) if per_layer else 1.0,
                heads_with_key_per_layer=per_layer, chunk_edges=edges, kept_share_by_chunk=split,
            ))  # fmt: skip
    finally:
        close_llm(llm)
    return dict(mode=mode, settings=section, budget=budget, keep=keep, block_size=bs,
                prefill_chunk=s.prefill_chunk, wall_s=wall, rows=rows,
                correct=sum(r["correct"] for r in rows), n=len(rows))  # fmt: skip


def render_md(result: dict) -> str:
    lines = [
        f"# Where the needle survives: `{result['policy']}` at {result['fraction']:.0%}",
        "",
        *provenance.markdown(result),
        "Share of KV heads (all layers) that hold every token of the key after the prompt; "
        "`kept by chunk`: how the kept tokens split over the block-wise chunks (the last one "
        "holds the question). A diagnostic of one run: 12 prompts cannot rank policies.",
        "",
    ]
    for m in result["modes"]:
        lines += [
            f"## `{m['mode']}`: {m['correct']}/{m['n']} correct (budget {m['budget']}, "
            f"{m['block_size']}-token blocks, chunk {m['prefill_chunk']})",
            "",
            "| phrasing | haystack | depth | key at | correct | heads with key | "
            "layers >= 2/3 of heads | kept by chunk | answer |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in m["rows"]:
            strong = sum(x >= 0.66 for x in r["heads_with_key_per_layer"])
            split = " / ".join(f"{x:.0%}" for x in r["kept_share_by_chunk"])
            lines.append(
                f"| {r['phrasing']} | {r['haystack']} | {r['depth']} | {r['key_at']} | "
                f"{'yes' if r['correct'] else 'no'} | {r['heads_with_key']:.0%} | {strong} | "
                f"{split} | `{r['text']}` |"
            )
        lost = [r for r in m["rows"] if r.get("lost_layers")]
        if lost:
            lines += ["", f"The trace lost track of {len(lost)} prompt(s) (recomputed after a "
                      "preemption or fallback); their shares count only the layers it kept."]  # fmt: skip
        ok = [r["heads_with_key"] for r in m["rows"] if r["correct"]]
        bad = [r["heads_with_key"] for r in m["rows"] if not r["correct"]]
        mean = lambda xs: f"{sum(xs) / len(xs):.0%}" if xs else "n/a (none)"  # noqa: E731
        lines += ["", f"Mean share of heads with the key: {mean(ok)} where the answer is "
                  f"right, {mean(bad)} where it is wrong.", ""]  # fmt: skip
    if result.get("plots"):
        lines += [f"![heads holding the key]({Path(result['plots'][0]).name})", ""]
    return "\n".join(lines)


def plot(result: dict, out_dir: Path, tag: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = result["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(3.8 * len(modes) + 1.5, 4.2), squeeze=False)
    for ax, m in zip(axes[0], modes, strict=True):
        grid = [r["heads_with_key_per_layer"] or [1.0] for r in m["rows"]]
        width = max(len(g) for g in grid)
        grid = [g + [float("nan")] * (width - len(g)) for g in grid]
        im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(m["rows"])))
        if ax is axes[0][0]:  # the prompts are the same in every panel
            ax.set_yticklabels([f"{r['phrasing'][:4]} {r['haystack'][:3]} {r['depth']}"
                                for r in m["rows"]], fontsize=7)  # fmt: skip
        else:
            ax.set_yticklabels([])
        for y, r in enumerate(m["rows"]):  # right or wrong, at the row's right end
            ax.text(1.01, 1 - (y + 0.5) / len(m["rows"]), "+" if r["correct"] else "-",
                    transform=ax.transAxes, va="center", fontsize=9)  # fmt: skip
        ax.set_xlabel("layer")
        ax.set_title(f"{m['mode']}: {m['correct']}/{m['n']}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="share of KV heads holding the key")
    fig.suptitle(f"{result['policy']} at {result['fraction']:.0%}: where the key survives "
                 "(+ right, - wrong)", fontsize=10)  # fmt: skip
    path = out_dir / f"{tag}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [str(path)]


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from benchmarks.eval.common import environment, resolve_model, write_results
    from benchmarks.tasks import retrieval_suite

    args = parse_args(argv)
    prov = provenance.record("benchmarks.needle_trace", argv)
    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    cases = retrieval_suite(tok, args.context_tokens, args.requests, seed=args.seed)
    modes = []
    for i, mode in enumerate(args.modes.split(",")):
        print(f"[{i + 1}/{len(args.modes.split(','))}] {mode} ...", file=sys.stderr, flush=True)
        m = trace_mode(mode, args, cases)
        print(f"  {m['correct']}/{m['n']} correct, {m['wall_s']:.0f} s", file=sys.stderr)
        modes.append(m)
    result = dict(
        policy=args.policy, fraction=args.fraction, context_tokens=args.context_tokens,
        seed=args.seed, modes=modes, environment=environment(),
        command=prov["command"],
        provenance=prov,
    )  # fmt: skip
    print(write_results(provenance.out_dir(args.out, args.tag), args.tag, result, render_md, plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
