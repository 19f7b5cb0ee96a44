"""The eval's tasks: passkey retrieval, KJV perplexity and LongBench QA, each sent to the engine
as one request batch per task (see :mod:`benchmarks.eval` for what they measure)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from benchmarks.eval.common import sampling, stats_of

FULL = "full"
CAOTE_PAIRS = [
    ("caote-snapkv", "snapkv"),
    ("caote-h2o", "h2o"),
    ("caote-tova", "tova"),
    ("fast-caote-snapkv", "snapkv"),
    ("fast-caote-h2o", "h2o"),
    ("fast-caote-tova", "tova"),
]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _bar(desc: str):
    """A tqdm factory for ``llm.generate(use_tqdm=...)`` with our own description."""

    def make(*a, **kw):
        kw["desc"] = desc
        return tqdm(*a, **kw)

    return make


def budget_grid(contexts, fractions, min_budget):
    """{context: [(label, fraction, tokens, clamped)]}; label FULL has tokens None."""
    grid = {}
    for ctx in contexts:
        rows = []
        for f in fractions:
            want = int(round(f * ctx))
            rows.append((f"{f:g}", f, max(want, min_budget), want < min_budget))
        rows.append((FULL, 1.0, None, False))
        grid[ctx] = rows
    return grid


def _cells(policies, budgets):
    """(policy, label, fraction, tokens, clamped) for every cell incl. one full-cache cell."""
    for label, frac, tokens, clamped in budgets:
        if tokens is None:
            yield (FULL, label, frac, None, False)
        else:
            for pol in policies:
                yield (pol, label, frac, tokens, clamped)


class _Batch:
    """The requests of one task, sent to the engine in ONE ``llm.generate`` call (each
    carries its own ``kv_policy``/``kv_budget`` in ``extra_args``)."""

    def __init__(self, task: str):
        self.task = task
        self.prompts: list = []
        self.params: list = []
        self.meta: list[dict] = []

    def add(self, prompt, cell, max_tokens: int, meta: dict, **sampling_kw) -> None:
        pol, label, frac, tokens, clamped = cell
        self.prompts.append(prompt)
        self.params.append(
            sampling(max_tokens, tokens, None if pol == FULL else pol, **sampling_kw)
        )
        self.meta.append(
            dict(
                meta,
                task=self.task,
                policy=pol,
                budget_label=label,
                budget_frac=frac,
                budget=tokens,
                clamped=clamped,
            )
        )

    def run(self, llm, finish) -> list[dict]:
        """Generate, then one row per request: ``finish(meta, output)`` plus common fields."""
        t0 = time.perf_counter()
        outs = llm.generate(self.prompts, self.params, use_tqdm=_bar(self.task))
        wall = time.perf_counter() - t0
        rows = [
            dict(
                m,
                **finish(m, o),
                prompt_tokens=len(o.prompt_token_ids),
                kv_eviction=stats_of(o),
            )
            for m, o in zip(self.meta, outs, strict=True)
        ]
        print(f"{self.task}: {len(rows)} requests in {wall:.0f} s", file=sys.stderr)
        return rows


def _retrieval(llm, args, grid, policies, task: str) -> list[dict]:
    """The retrieval suite (``--suite retrieval``): every needle phrasing x haystack x depth
    x sample, each stating the key once (:func:`benchmarks.tasks.retrieval_case`)."""
    from benchmarks.tasks import HAYSTACKS, PASSKEY_NEEDLES, retrieval_case

    tok = llm.get_tokenizer()
    batch = _Batch(task)
    for ctx in _ints(args.contexts):
        for phrasing in PASSKEY_NEEDLES:
            for haystack in HAYSTACKS:
                for depth in _floats(args.depths):
                    for s in range(args.samples):
                        case = retrieval_case(tok, task, ctx, depth, phrasing, haystack,
                                              seed=args.seed * 1000 + s)  # fmt: skip
                        meta = dict(context=ctx, depth=case.depth, sample=s,
                                    passkey=case.answer, phrasing=phrasing, haystack=haystack)  # fmt: skip
                        for cell in _cells(policies, grid[ctx]):
                            # multi-key answers restate the question first: 24 tokens
                            batch.add(case.prompt, cell, 24 if task == "multikey" else 12, meta)

    def finish(m, o):
        text = o.outputs[0].text
        return dict(answer=text, correct=m["passkey"] in text)

    return batch.run(llm, finish)


def run_passkey(llm, args, grid, policies) -> list[dict]:
    from benchmarks.tasks import passkey_case

    if getattr(args, "suite", "classic") == "retrieval":
        return _retrieval(llm, args, grid, policies, "passkey")
    tok = llm.get_tokenizer()
    batch = _Batch("passkey")
    for ctx in _ints(args.contexts):
        for depth in _floats(args.depths):
            for s in range(args.samples):
                case = passkey_case(tok, ctx, depth, seed=args.seed * 1000 + s)
                meta = dict(context=ctx, depth=depth, sample=s, passkey=case.passkey)
                for cell in _cells(policies, grid[ctx]):
                    batch.add(case.prompt, cell, 12, meta)

    def finish(m, o):
        text = o.outputs[0].text
        return dict(answer=text, correct=m["passkey"] in text)

    return batch.run(llm, finish)


def run_multikey(llm, args, grid, policies) -> list[dict]:
    """RULER-style multi-key retrieval: 4 labelled numbers, the question asks for one."""
    from benchmarks.tasks import multikey_case

    if getattr(args, "suite", "classic") == "retrieval":
        return _retrieval(llm, args, grid, policies, "multikey")
    tok = llm.get_tokenizer()
    batch = _Batch("multikey")
    n_cases = max(1, len(_floats(args.depths))) * args.samples
    for ctx in _ints(args.contexts):
        for s in range(n_cases):
            case = multikey_case(tok, ctx, seed=args.seed * 1000 + s)
            meta = dict(context=ctx, depth=case.depth, sample=s, passkey=case.passkey)
            for cell in _cells(policies, grid[ctx]):
                # the model restates the question ("The special magic number for X is ..."):
                # 12 tokens would cut the number off
                batch.add(case.prompt, cell, 24, meta)

    def finish(m, o):
        text = o.outputs[0].text
        return dict(answer=text, correct=m["passkey"] in text)

    return batch.run(llm, finish)


def _passages(tok, ctx: int, n: int, seed: int) -> list[list[int]]:
    from benchmarks.tasks import kjv_passages

    out = []
    for text in kjv_passages(n, min_chars=ctx * 6, seed=seed * 7919 + ctx):
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) < ctx:
            raise RuntimeError(f"KJV passage too short: {len(ids)} < {ctx} tokens")
        out.append(ids[:ctx])
    return out


def run_longbench(llm, args, fractions, min_budget, policies, max_context) -> list[dict]:
    """LongBench QA: each budget is a fraction of that example's own prompt length."""
    from benchmarks.eval import longbench
    from vllm_caote.models import home

    tok = llm.get_tokenizer()
    batch = _Batch("longbench")
    for subset in [s for s in args.longbench_subsets.split(",") if s]:
        recs = longbench.load(subset, args.longbench_dir, args.longbench_limit, home() / "hub")
        for rec in recs:
            prompt, ctx_tokens = longbench.build_prompt(tok, rec, max_context)
            n = len(tok.encode(prompt, add_special_tokens=False))
            cells = budget_grid([n], fractions, min_budget)[n]
            meta = dict(dataset=subset, id=rec["id"], context=ctx_tokens, answers=rec["answers"])
            for cell in _cells(policies, cells):
                batch.add(prompt, cell, 32, meta)

    def finish(m, o):
        text = o.outputs[0].text
        return dict(answer=text, f1=longbench.qa_f1(text, m["answers"]))

    return batch.run(llm, finish)


def run_ppl(llm, args, grid, policies, chunk: int) -> list[dict]:
    tok = llm.get_tokenizer()
    batch = _Batch("ppl")
    for ctx in _ints(args.contexts):
        for i, ids in enumerate(_passages(tok, ctx, args.ppl_passages, args.seed)):
            for cell in _cells(policies, grid[ctx]):
                batch.add({"prompt_token_ids": ids}, cell, 1, dict(context=ctx, passage=i),
                          prompt_logprobs=0)  # fmt: skip

    def finish(m, o):
        ids = o.prompt_token_ids
        nll = [-o.prompt_logprobs[pos][ids[pos]].logprob for pos in range(1, len(ids))]
        tail = nll[chunk - 1 :] if chunk else []  # positions >= chunk
        return dict(
            tokens=len(ids),
            nll_sum=sum(nll),
            nll_n=len(nll),
            nll_tail_sum=sum(tail),
            nll_tail_n=len(tail),
        )

    return batch.run(llm, finish)
