"""Paired, powered comparison of eviction policies: CAOTE-X vs X on the same prompts (issue #32).

    python -m benchmarks.paired --prompts 240 --lm-prompts 96 --tag paired
    python -m benchmarks.paired --dump-cases cases.json ...   # prompts only (no model run)
    python -m benchmarks.paired --cases cases.json --device cuda ...

A torch-only offline harness (:mod:`benchmarks.paired_model`) on the embedded SmolLM2
(float32): each prompt is read once with the full cache, then every policy's kept tokens are
selected with the plugin's own scoring and ``select_keep`` exactly as the engine does with the
whole prompt in view (``prefill: adaptive`` with room, or ``oneshot``), and the right answer is
teacher-forced after the prompt on each evicted cache. Optionally (``--blockwise N``) the first
``N`` prompts of each kind are also read block-wise (evicted after every chunk).

Per prompt: retrieval (passkey / multi-key among essays or KJV, and with ``--lookalike N``
key-value sentences of one shape among look-alike distractors, :mod:`benchmarks.tasks`,
seeds apart from the committed evals') scores the summed log-probability of the answer's
tokens and whether each after the first is the greedy choice (the engine reads the first from
the full-cache prefill, so it is the same under every policy); language modelling (KJV
continuations) scores the mean log-probability of the next ``--lm-tokens`` tokens. Every CAOTE-X is compared with X on the
same prompts: mean paired difference with a bootstrap 95% interval, and McNemar counts for
retrieval accuracy (:mod:`benchmarks.paired_stats`). A policy named ``X+seg`` is X's scores
with whole segments kept (:func:`vllm_caote.scoring.select_keep_segments`: sentences ended by
``.!?;:`` or a newline, cut into ``--segment-len`` pieces from their end), compared with X.
Results: ``<out>/<tag>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import sys
import time
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import provenance
from benchmarks.paired_model import (
    Harness,
    keep_indices,
    keep_tokens,
    load_model,
    policy_scores,
)
from benchmarks.paired_stats import plot, render_md, summarize
from vllm_caote.config import EvictionSettings
from vllm_caote.scoring import get_policy

BASES = ["snapkv", "tova", "h2o", "keydiff", "expected-attention"]
#: seeds of the committed evals are 0 and 1: these prompts are held out from them
DEFAULT_SEED = 3200


def default_policies(bases: list[str]) -> list[str]:
    out = []
    for b in bases:
        out += [b, "caote-" + b, "fast-caote-" + b]
    return [*out, "streaming"]


#: a token that holds one of these ends a segment (``X+seg`` policies)
SEGMENT_ENDS = ".!?;:\n"
SEG = "+seg"


def boundary_ids(tok) -> set[int]:
    """Token ids whose text holds a segment end (:data:`SEGMENT_ENDS`)."""
    return {i for i in range(len(tok)) if any(c in tok.decode([i]) for c in SEGMENT_ENDS)}


#: a CAOTE form in the paper's form (knob ``caote_alpha="attention"``): ``caote-X+paper``
PAPER = "+paper"


def parse_policy(name: str):
    """``(policy, segments)`` of a ``--policies`` entry: ``X``, ``X+seg``, ``caote-X+paper`` or
    ``caote-X+paper+seg`` (``+paper``: CAOTE on each window query's attention rows, pooled
    after; :mod:`vllm_caote.scoring.caote_window`)."""
    seg = name.endswith(SEG)
    name = name[: -len(SEG)] if seg else name
    paper = name.endswith(PAPER)
    policy = get_policy(name[: -len(PAPER)] if paper else name)
    if paper:
        if policy.meta is None:
            raise ValueError(f"{PAPER} applies to CAOTE forms only, not {policy.name!r}")
        policy = dataclasses.replace(policy, caote_alpha="attention")
    return policy, seg


#: harness-only selection overrides appended to a policy's name: ``@r0.5`` (``recent``),
#: ``@f4`` (``fill_recent``); several may follow one another
SELECTION_RE = re.compile(r"@([rf])([0-9]*\.?[0-9]+)")


def split_selection(name: str) -> tuple[str, dict]:
    """``(name without its @-overrides, keep_indices keyword overrides)``."""
    opts = {}
    for key, value in SELECTION_RE.findall(name):
        opts["recent" if key == "r" else "outlier"] = float(value)
    base = SELECTION_RE.sub("", name)
    if "@" in base:
        raise ValueError(f"unknown selection override in {name!r} (use @r<share>, @f<outlier>)")
    return base, opts


def policy_label(policy, seg: bool) -> str:
    """The name a parsed ``--policies`` entry is reported under."""
    paper = getattr(policy, "caote_alpha", "base") == "attention"
    return policy.name + (PAPER if paper else "") + (SEG if seg else "")


def _label(name: str) -> str:
    """The report name of a ``--policies`` entry: the parsed policy's label, then any
    @-overrides as written."""
    base, _ = split_selection(name)
    return policy_label(*parse_policy(base)) + "".join(
        m.group(0) for m in SELECTION_RE.finditer(name)
    )


def make_cases(
    tok, n_retrieval: int, n_lm: int, context: int, lm_tokens: int, seed: int, lookalike=(0, 16)
):
    """Retrieval (the suite, then ``lookalike[0]`` look-alike prompts of ``lookalike[1]``
    pairs) and KJV cases, interleaved (so any prefix holds both kinds in proportion). Each
    case lists its segment-ending positions (``ends``)."""
    from benchmarks.tasks import kjv_passages, lookalike_suite, retrieval_suite

    depths = (0.1, 0.3, 0.5, 0.7, 0.9)
    ret = []
    for c in retrieval_suite(tok, context, n_retrieval, ("passkey", "multikey"), depths, seed):
        ids = tok.encode(c.prompt, add_special_tokens=False)
        meta = dict(task=c.task, phrasing=c.phrasing, haystack=c.haystack, depth=c.depth)
        ret.append(dict(kind="retrieval", ids=ids, target=tok.encode(c.answer), meta=meta))
    for c in lookalike_suite(tok, context, lookalike[0], lookalike[1], seed):
        ids = tok.encode(c.prompt, add_special_tokens=False)
        meta = dict(task="lookalike", values=c.values, haystack=c.haystack, depth=c.depth)
        ret.append(dict(kind="retrieval", ids=ids, target=tok.encode(c.answer), meta=meta))
    lm = []
    for i, text in enumerate(kjv_passages(n_lm, (context + lm_tokens) * 6, seed * 7919 + 17)):
        ids = tok.encode(text, add_special_tokens=False)[: context + lm_tokens]
        lm.append(dict(kind="lm", ids=ids[:context], target=ids[context:], meta=dict(passage=i)))
    cases, i, j = [], 0, 0
    while i < len(ret) or j < len(lm):  # interleave in proportion
        if j >= len(lm) or (i < len(ret) and i * max(len(lm), 1) <= j * max(len(ret), 1)):
            cases.append(ret[i])
            i += 1
        else:
            cases.append(lm[j])
            j += 1
    ends = boundary_ids(tok)
    for k, c in enumerate(cases):
        c["case"] = k
        c["ends"] = [j for j, t in enumerate(c["ids"]) if t in ends]
    return cases


def case_segments(case: dict, segment_len: int) -> torch.Tensor:
    """Segment ids ``[n]`` of a case's prompt tokens (:func:`segment_ids`)."""
    from vllm_caote.scoring import segment_ids

    b = torch.zeros(len(case["ids"]), dtype=torch.bool)
    b[case["ends"]] = True
    return segment_ids(b, segment_len)


def _rows(case, mode, frac, keep, names, lp, hits) -> list[dict]:
    out = []
    for name, l_row, h_row in zip(names, lp.cpu(), hits.cpu(), strict=True):
        lsum, m = float(l_row.sum()), len(l_row)
        retrieval = case["kind"] == "retrieval"
        out.append(
            dict(
                case=case["case"],
                kind=case["kind"],
                mode=mode,
                budget=frac,
                keep=keep,
                n=len(case["ids"]),
                policy=name,
                logprob_sum=lsum,
                logprob_mean=lsum / m,
                hits=int(h_row.sum()),
                hit_first=bool(h_row[0]),
                hits_tail=int(h_row[1:].sum()),
                m=m,
                score=lsum if retrieval else lsum / m,
                # the first token is read from the full-cache prefill (the same under every
                # policy): retrieval accuracy is every later answer token greedy
                correct=bool(h_row[1:].all()) if retrieval else float(h_row.float().mean()),
            )
        )
    return out


def run_case(
    h: Harness, case, names, fracs, block_size, blockwise, chunk, oneshot=True, segment_len=24
):
    """Every policy x budget of one case (and the full cache): result rows."""
    split = [split_selection(p) for p in names]
    opts = [o for _, o in split]
    parsed = [parse_policy(p) for p, _ in split]
    policies = [p for p, _ in parsed]
    seg_ids = case_segments(case, segment_len) if any(s for _, s in parsed) else None
    segs = [seg_ids if s else None for _, s in parsed]
    ids, target = case["ids"], case["target"]
    n = len(ids)
    rows = (
        []
        if oneshot
        else _blockwise(h, case, names, policies, fracs, block_size, chunk, segs, opts)
    )
    if not oneshot:
        return rows
    cap = h.prefill(ids)
    rows = []
    full = [(k[None], v[None]) for k, v in zip(cap.keys, cap.values, strict=True)]
    lp, hits = h.continue_rows(full, n, cap.last_logits, target)
    for frac in fracs:
        rows += _rows(case, "oneshot", frac, n, ["full"], lp, hits)
    scores = [[policy_scores(p, cap, li, h) for li in range(h.layers)] for p in policies]
    for frac in fracs:
        keep = keep_tokens(n, frac, block_size)
        sel = [[keep_indices(p, s[li], keep, h, g, **o) for li in range(h.layers)] for p, s, g, o in zip(policies, scores, segs, opts, strict=True)]  # fmt: skip
        lp, hits = h.continue_rows(h.gather_rows(cap, sel), n, cap.last_logits, target)
        rows += _rows(case, "oneshot", frac, keep, names, lp, hits)
    del cap, scores, full
    if blockwise:
        rows += _blockwise(h, case, names, policies, fracs, block_size, chunk, segs, opts)
    return rows


def _blockwise(h: Harness, case, names, policies, fracs, block_size, chunk, segs, opts) -> list[dict]:  # fmt: skip
    ids, target, n, rows = case["ids"], case["target"], len(case["ids"]), []
    try:
        for frac in fracs:
            keep = keep_tokens(n, frac, block_size)
            past, last = h.blockwise(ids, policies, keep, chunk, segs, opts)
            lp, hits = h.continue_rows(past, n, last, target)
            rows += _rows(case, "blockwise", frac, keep, names, lp, hits)
    except Exception:  # noqa: BLE001 - reported; the whole-prompt rows stand
        traceback.print_exc()
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.paired",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prompts", type=int, default=240, help="retrieval prompts (default 240)")
    p.add_argument("--lm-prompts", type=int, default=96, help="KJV continuations (default 96)")
    p.add_argument("--context", type=int, default=1024, help="haystack tokens (default 1024)")
    p.add_argument("--lookalike", type=int, default=0, help="look-alike prompts (default 0)")
    p.add_argument("--lookalike-pairs", type=int, default=16, help="their key-value sentences")
    p.add_argument("--segment-len", type=int, default=24, help="X+seg: longest segment")
    p.add_argument("--lm-tokens", type=int, default=64, help="LM tokens scored (default 64)")
    p.add_argument("--budgets", default="0.125,0.25,0.5", help="fractions of each prompt")
    p.add_argument("--bases", default=",".join(BASES), help="bases X compared with CAOTE-X")
    p.add_argument(
        "--policies",
        default=None,
        help="policies to run (default: every base, its CAOTE forms, and streaming)",
    )
    p.add_argument("--block-size", type=int, default=32, help="budgets round up to blocks")
    p.add_argument("--blockwise", type=int, default=0, help="prompts of each kind run block-wise")
    p.add_argument("--chunk", type=int, default=512, help="block-wise chunk (default 512)")
    p.add_argument("--no-oneshot", action="store_true", help="only the block-wise prompts")
    p.add_argument("--merge", default=None, help="JSONs of earlier runs: summarize their rows")
    p.add_argument(
        "--recent",
        type=float,
        default=None,
        help="kv_eviction.recent: the protected recent share of the budget (default: the "
        "settings' default)",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    p.add_argument("--max-seconds", type=float, default=0, help="stop taking new prompts after")
    p.add_argument("--cases", default=None, help="read the prompts from this JSON")
    p.add_argument("--dump-cases", default=None, help="write the prompts to this JSON and stop")
    p.add_argument("--commit", default=None, help="commit to record (default: git's)")
    p.add_argument("--out", help="output folder (default benchmarks/results/<tag>/)")
    p.add_argument("--tag", default="paired")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fracs = [float(x) for x in args.budgets.split(",") if x.strip()]
    bases = [b for b in args.bases.split(",") if b]
    names = args.policies.split(",") if args.policies else default_policies(bases)
    names = [_label(n) for n in names]
    if args.merge:
        return _merge(args, bases)
    if args.cases:
        cases = json.loads(Path(args.cases).read_text())
        tok = None
    else:
        from transformers import AutoTokenizer

        from vllm_caote.models import model_dir

        tok = AutoTokenizer.from_pretrained(str(args.model or model_dir()))
        look = (args.lookalike, args.lookalike_pairs)
        cases = make_cases(tok, args.prompts, args.lm_prompts, args.context, args.lm_tokens, args.seed, look)  # fmt: skip
    if args.dump_cases:
        Path(args.dump_cases).write_text(json.dumps(cases))
        print(f"{len(cases)} cases -> {args.dump_cases}", file=sys.stderr)
        return 0
    model, _ = load_model(args.model, tokenizer=False)
    settings = EvictionSettings() if args.recent is None else EvictionSettings(recent=args.recent)
    h = Harness(model.to(args.device), settings)
    rows, t0, done = [], time.time(), 0
    seen = {"retrieval": 0, "lm": 0}
    for case in tqdm(cases, desc="paired", file=sys.stderr):
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            print(f"--max-seconds reached after {done} prompts", file=sys.stderr)
            break
        bw = seen[case["kind"]] < args.blockwise
        seen[case["kind"]] += 1
        if args.no_oneshot and not bw:
            continue
        rows += run_case(h, case, names, fracs, args.block_size, bw, args.chunk, not args.no_oneshot, args.segment_len)  # fmt: skip
        done += 1
    from benchmarks.eval.common import write_results

    prov = provenance.record("benchmarks.paired", argv)
    if args.commit:  # a run on a copy that is not a git checkout (the GPU machine)
        prov.update(commit=args.commit, dirty=False, changes=[])
    s = h.settings
    result = dict(
        tag=args.tag,
        provenance=prov,
        device=torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or "cpu",  # fmt: skip
        torch=torch.__version__,
        wall_s=time.time() - t0,
        config=dict(
            **_counts(rows),
            context=args.context,
            lm_tokens=args.lm_tokens,
            budgets=fracs,
            policies=names,
            bases=bases,
            block_size=args.block_size,
            blockwise=args.blockwise,
            chunk=args.chunk,
            seed=args.seed,
            lookalike=args.lookalike,
            lookalike_pairs=args.lookalike_pairs,
            segment_len=args.segment_len,
            sinks=s.sinks,
            window=s.window,
            recent=s.recent,
        ),
        rows=rows,
    )
    out = provenance.out_dir(args.out, args.tag)
    (out / f"{args.tag}.json").write_text(json.dumps(result))  # the rows, before any summary
    result["summary"] = summarize(rows, bases)
    print(write_results(out, args.tag, result, render_md, plot))
    return 0


def _counts(rows) -> dict:
    """Prompts of each kind read whole (``retrieval``, ``lm``) and block-wise (``blockwise``)."""
    ones = {(r["kind"], r["case"]) for r in rows if r["mode"] == "oneshot"}
    bw = {(r["kind"], r["case"]) for r in rows if r["mode"] == "blockwise"}
    return dict(
        retrieval=sum(k == "retrieval" for k, _ in ones),
        lm=sum(k == "lm" for k, _ in ones),
        blockwise_prompts=len(bw),
    )


def _merge(args, bases) -> int:
    """One report from the rows of earlier runs (``--merge a.json,b.json``): the first run's
    header, every run's rows, the commands and wall times of all."""
    from benchmarks.eval.common import write_results

    runs = [json.loads(Path(f).read_text()) for f in args.merge.split(",") if f]
    result = dict(runs[0], tag=args.tag, rows=[r for run in runs for r in run["rows"]])
    commands = [(run.get("provenance") or run)["command"] for run in runs]
    result["provenance"] = dict(result.get("provenance") or {}, command=" ; ".join(commands))
    result["wall_s"] = sum(run["wall_s"] for run in runs)
    merged = provenance.command_line("benchmarks.paired", None)
    result["notes"] = [*result.get("notes", []), f"report merged by `{merged}`"]
    result["config"] = dict(result["config"], **_counts(result["rows"]))
    result["summary"] = summarize(result["rows"], result["config"]["bases"])
    print(write_results(provenance.out_dir(args.out, args.tag), args.tag, result, render_md, plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
