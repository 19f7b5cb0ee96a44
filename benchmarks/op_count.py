"""``python -m benchmarks.op_count``: torch ops launched per generated token (issue #29).

A decode-heavy budgeted run on the in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the
engine core and the model run in this process, so the profiler sees the model's ops), counted
with ``torch.profiler`` (CPU activity, ``with_stack=True``) over every engine step, in chunks of
``--chunk-steps`` steps (one profiler session each, read and dropped: memory stays bounded).
The same request(s) run unbudgeted on the same engine as the baseline.

Only **top-level** ops are counted: an op event whose nearest enclosing event is not itself an
op (an ``aten::copy_`` inside ``aten::to`` is not counted; an op a Python function launched,
even inside vLLM's opaque attention custom op, is). Each is attributed by its Python stack:

* **eviction**: the stack passes through a compaction entry point (:data:`EVICTION_ENTRIES`:
  ``engine/evict.py:compact_layer``, or ``engine/step.py:_compact`` before it existed), i.e.
  scoring, selection, reads and writes of ``engine/compaction.py`` and ``scoring/`` while
  compacting;
* **per-step**: otherwise, the innermost Python frame outside torch and the standard library
  is plugin code (``vllm_caote/``, not ``benchmarks/``): query recording, scoring state,
  step inputs;
* **model**: the rest (vLLM and the model).

Budgeted minus unbudgeted total is the plugin's whole cost, a check on the attribution (plugin
code calling vLLM helpers counts as model above). The script imports only what the plugin has
had for long (``bench.eval.common``, ``bench.tasks``), so it runs against older checkouts:
``PYTHONPATH=<checkout> python <this file> --label before``. ``--merge a.json b.json`` writes
the before/after report (``<tag>.{json,md,png}``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks import provenance

#: (file suffix, function): frames whose calls are eviction work, in old and new layouts
EVICTION_ENTRIES = frozenset(
    {
        ("vllm_caote/engine/evict.py", "compact_layer"),  # batched, one call per layer
        ("vllm_caote/engine/step.py", "_compact"),  # per request and layer (before #29)
        ("vllm_caote/engine/step.py", "_trim_blocks"),  # the worker's block records
    }
)
CATEGORIES = ("model", "per_step", "eviction")
_FRAME = re.compile(r"^(.*)\((\d+)\): (.*)$")
# frame name -> (transparent, plugin, eviction entry)
_FRAME_CACHE: dict[str, tuple[bool, bool, bool]] = {}


def _frame_kind(name: str) -> tuple[bool, bool, bool]:
    kind = _FRAME_CACHE.get(name)
    if kind is None:
        m = _FRAME.match(name)
        if m is None:  # "<built-in method ...>" and the like: no file of its own
            kind = (True, False, False)
        else:
            path, func = m.group(1).replace("\\", "/"), m.group(3)
            i = path.rfind("vllm_caote/")
            plugin = i >= 0 and not path.startswith(
                ("vllm_caote/benchmarks/", "vllm_caote/loadtest/"), i
            )
            tail = path[i:] if i >= 0 else ""
            transparent = not plugin and (
                path.startswith("torch/") or "/torch/" in path or "/" not in path
            )  # torch's own Python and the standard library (relative names)
            kind = (transparent, plugin, (tail, func) in EVICTION_ENTRIES)
        _FRAME_CACHE[name] = kind
    return kind


def classify(events, counts: Counter, frames: Counter) -> None:
    """Count the top-level op events of one profiler session into ``counts[category]`` and
    ``frames[(category, innermost plugin-or-model frame)]``."""
    by_thread: dict[int, list] = {}
    for e in events:
        by_thread.setdefault(e.start_thread_id(), []).append(
            (e.start_ns(), -e.end_ns(), e.is_python_function(), e.name())
        )
    for evs in by_thread.values():
        evs.sort()
        # stack entries: (end_ns, in_op, evicting, owner_is_plugin, owner frame)
        stack: list[tuple[int, bool, bool, bool, str]] = []
        for start, neg_end, is_py, name in evs:
            end = -neg_end
            while stack and stack[-1][0] <= start:
                stack.pop()
            _, in_op, evicting, plugin, owner = stack[-1] if stack else (0, False, False, False, "")
            if is_py:
                transparent, is_plugin, entry = _frame_kind(name)
                if not transparent:
                    plugin, owner = is_plugin, name
                stack.append((end, False, evicting or entry, plugin, owner))
            elif "::" in name:  # an op (aten::, vllm::, _C::, ...)
                if not in_op:
                    cat = "eviction" if evicting else "per_step" if plugin else "model"
                    counts[cat] += 1
                    frames[(cat, owner)] += 1
                stack.append((end, True, evicting, plugin, owner))
            else:  # a record_function scope: transparent
                stack.append((end, in_op, evicting, plugin, owner))


def count_ops(llm, requests, chunk_steps: int = 32, progress=None) -> dict:
    """Add ``requests`` (``[(prompt ids, SamplingParams)]``) to the in-process engine and step
    it to completion under the profiler. Returns op counts per category for the whole run and
    for its decode phase (steps in which no request was prefilling), steps, generated tokens
    and each request's eviction stats."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.eval.common import scheduler_of, stats_of

    engine, sched = llm.llm_engine, scheduler_of(llm)
    base = f"opc-{time.monotonic_ns()}"
    for i, (ids, params) in enumerate(requests):
        engine.add_request(f"{base}-{i}", {"prompt_token_ids": ids}, params)
    phases = {"prefill": Counter(), "decode": Counter()}
    frames: Counter = Counter()
    outputs, steps = {}, {"prefill": 0, "decode": 0}
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        reqs = list(sched.running) + list(sched.waiting)
        prefilling = bool(sched.waiting) or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in reqs
        )
        phase = "prefill" if prefilling else "decode"
        n = 1 if prefilling else chunk_steps  # a prefill step is a chunk of its own
        done = 0
        with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
            while done < n and engine.has_unfinished_requests():
                for o in engine.step():
                    if o.finished:
                        outputs[o.request_id] = o
                done += 1
        classify(prof.profiler.kineto_results.events(), phases[phase], frames)
        del prof
        gc.collect()  # the session's events sit in a reference cycle: gigabytes, not freed
        steps[phase] += done
        if progress is not None:
            progress(done)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs.values())
    total = phases["prefill"] + phases["decode"]
    stats = [stats_of(o) for o in outputs.values()]
    return dict(
        ops={c: total[c] for c in CATEGORIES},
        decode_ops={c: phases["decode"][c] for c in CATEGORIES},
        prefill_ops={c: phases["prefill"][c] for c in CATEGORIES},
        steps=steps,
        generated_tokens=generated,
        evictions=sum((s or {}).get("eviction_events", 0) for s in stats),
        evicted_tokens=sum((s or {}).get("evicted_tokens", 0) for s in stats),
        stats=stats,
        top_frames=[[c, f, k] for (c, f), k in frames.most_common(40) if c != "model"],
        wall_s=time.perf_counter() - t0,
    )


def per_token(run: dict) -> dict:
    g = max(1, run["generated_tokens"])
    out = {c: run["ops"][c] / g for c in CATEGORIES}
    out["total"] = sum(out.values())
    return out


def measure(args) -> dict:
    """One label: the budgeted run and the unbudgeted baseline on one engine."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm_caote
    from benchmarks.eval.common import close_llm, environment, make_llm, sampling
    from benchmarks.tasks import filler_prompt_ids

    pkg = Path(vllm_caote.__file__).resolve().parent
    prov = provenance.record("benchmarks.op_count", repo=pkg.parent)  # the checkout measured
    seq = args.prompt_tokens + args.output_tokens
    blocks = args.requests * -(-seq // args.block_size) + 8
    llm = make_llm(None, max_model_len=seq + args.block_size,
                   num_gpu_blocks_override=blocks, block_size=args.block_size)  # fmt: skip
    tok = llm.get_tokenizer()

    def reqs(budget, n_out, offset):
        return [
            (filler_prompt_ids(tok, args.prompt_tokens, offset + 1500 * i),
             sampling(n_out, budget, args.policy if budget else None, ignore_eos=True,
                      skip_reading_prefix_cache=True))
            for i in range(args.requests)
        ]  # fmt: skip

    # warm-up: one-time initialisation (lazy tables, first calls) out of the counts
    count_ops(llm, reqs(args.budget, 2 * args.block_size, 20000), chunk_steps=10**6)
    count_ops(llm, reqs(None, 8, 20000), chunk_steps=10**6)
    from tqdm import tqdm

    runs = {}
    variants = [("budgeted", args.budget)] + ([] if args.no_baseline else [("unbudgeted", None)])
    for name, budget in variants:
        with tqdm(total=args.output_tokens + 1, desc=f"{args.label} {name}", unit="step") as bar:
            runs[name] = count_ops(llm, reqs(budget, args.output_tokens, 0), args.chunk_steps,
                                   progress=bar.update)  # fmt: skip
        runs[name]["per_token"] = per_token(runs[name])
        print(f"{args.label} {name}: {runs[name]['per_token']} ops/token, "
              f"{runs[name]['evictions']} evictions", file=sys.stderr)  # fmt: skip
    close_llm(llm)
    b, u = runs["budgeted"], runs.get("unbudgeted")
    return dict(
        label=args.label,
        config={k: v for k, v in vars(args).items() if k not in ("merge",)},
        command=prov["command"],
        provenance=prov,
        pythonpath=os.environ.get("PYTHONPATH", ""),
        plugin=str(pkg),
        environment=environment(),
        runs=runs,
        overhead_per_token=b["per_token"]["total"] - u["per_token"]["total"] if u else None,
        eviction_ops_per_eviction=b["ops"]["eviction"] / max(1, b["evictions"]),
        profiled="every engine step of both runs (warm-up excluded), with_stack, no shapes",
    )


def _decode_evictions(r: dict) -> int:
    b = r["runs"]["budgeted"]
    return b["evictions"] - (r["config"]["requests"] if b["prefill_ops"]["eviction"] else 0)


def merge(paths: list[str]) -> dict:
    results = [json.loads(Path(p).read_text()) for p in paths]
    out: dict = {"results": results, "inputs": paths}
    if len(results) == 2:
        b, a = (r["runs"]["budgeted"] for r in results)
        ev_b, ev_a = b["per_token"]["eviction"], a["per_token"]["eviction"]
        out["eviction_ratio"] = ev_b / ev_a if ev_a else None
        out["cadence_ratio"] = b["evictions"] / a["evictions"] if a["evictions"] else None
        ops = [r["runs"]["budgeted"]["decode_ops"]["eviction"] for r in results]
        out["decode_eviction_ratio"] = ops[0] / ops[1] if ops[1] else None
        # decode evictions: all but the prompt's (one per request, when the prefill evicted)
        dec = [_decode_evictions(r) for r in results]
        out["decode_cadence_ratio"] = dec[0] / dec[1] if dec[1] else None
        per = [r["runs"]["budgeted"]["ops"]["eviction"] / max(1, r["runs"]["budgeted"]["evictions"])
               for r in results]  # fmt: skip
        out["ops_per_eviction"] = per
    return out


def _row(name: str, r: dict, run: str) -> str:
    x = r["runs"][run]
    p = x["per_token"]
    per_ev = x["ops"]["eviction"] / x["evictions"] if x["evictions"] else 0
    return (f"| {name} | {run} | {p['model']:.1f} | {p['per_step']:.1f} | {p['eviction']:.1f} | "
            f"{p['total']:.1f} | {x['evictions']} | {per_ev:.0f} | {x['generated_tokens']} |")  # fmt: skip


def _x(ratio) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def render_md(m: dict) -> str:
    rs = m["results"]
    c = rs[0]["config"]
    lines = [
        "# Torch ops per generated token (issue #29)",
        "",
        *(provenance.markdown(m) if "provenance" in m else []),  # the merge's; runs: below
        f"{c['requests']} request(s) x {c['prompt_tokens']}-token essay prompt, "
        f"{c['output_tokens']} output tokens (ignore_eos, greedy), block size {c['block_size']}, "
        f"policy `{c['policy']}`, kv_budget {c['budget']} (budgeted) vs none (unbudgeted), "
        "in-process vLLM-CPU engine (fp32, eager). Counted with `torch.profiler` (CPU, "
        f"with_stack) over {rs[0]['profiled']}; top-level ops only (an op inside another op is "
        "not counted). Columns: ops per generated token, prefill included.",
        "",
        "| code | run | model | per-step plugin | eviction | total | evictions | "
        "eviction ops / eviction | tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rs:
        for run in r["runs"]:
            lines.append(_row(r["label"], r, run))
    lines += ["", "| code | budgeted - unbudgeted total ops/token | stack-attributed plugin "
              "(per-step + eviction) | decode-phase eviction ops |", "|---|---|---|---|"]  # fmt: skip
    for r in rs:
        p = r["runs"]["budgeted"]["per_token"]
        over = r["overhead_per_token"]
        lines.append(f"| {r['label']} | {'-' if over is None else f'{over:.1f}'} | "
                     f"{p['per_step'] + p['eviction']:.1f} | "
                     f"{r['runs']['budgeted']['decode_ops']['eviction']} |")  # fmt: skip
    if m.get("eviction_ratio") is not None and m.get("cadence_ratio") is not None:
        ok = m["eviction_ratio"] >= m["cadence_ratio"]
        lines += [
            "",
            f"Eviction ops per token, {rs[0]['label']} / {rs[1]['label']}: "
            f"**{m['eviction_ratio']:.2f}x**; eviction cadence ratio (evictions "
            f"{rs[0]['runs']['budgeted']['evictions']} / {rs[1]['runs']['budgeted']['evictions']})"
            f": {m['cadence_ratio']:.2f}x. Target (eviction work falls at least in proportion to "
            f"the cadence): **{'met' if ok else 'not met'}**. Decode phase only (the prompt's "
            f"eviction, one per request in both, left out): {_x(m['decode_eviction_ratio'])} "
            f"for a decode cadence ratio of {_x(m['decode_cadence_ratio'])} "
            f"({_decode_evictions(rs[0])} / {_decode_evictions(rs[1])} decode evictions).",
            "",
            f"Eviction ops per eviction: {rs[0]['label']} {m['ops_per_eviction'][0]:.0f}, "
            f"{rs[1]['label']} {m['ops_per_eviction'][1]:.0f} "
            f"({m['ops_per_eviction'][1] / m['ops_per_eviction'][0] - 1:+.1%}): eviction work "
            "falls in proportion to the cadence exactly when this stays put.",
        ]
    lines += ["", "## Runs", ""]
    for r in rs:
        g = r.get("provenance") or r["git"]  # "git": results recorded before provenance
        lines += [
            f"- **{r['label']}**: plugin `{r['plugin']}`, commit `{g['commit']}`"
            f"{' (working tree dirty)' if g['dirty'] else ''}; `"
            + (f"PYTHONPATH={r['pythonpath']} " if r["pythonpath"] else "")
            + f"{r['command']}`; wall {r['runs']['budgeted']['wall_s']:.0f} s + "
            f"{r['runs'].get('unbudgeted', {}).get('wall_s', 0):.0f} s (profiled)",
            "  - plugin frames launching the most ops (budgeted): "
            + "; ".join(
                f"{cat} `{f}` {k}" for cat, f, k in r["runs"]["budgeted"]["top_frames"][:6]
            ),
        ]
    lines += [
        "",
        "Attribution: *eviction* = ops whose stack passes through a compaction entry point "
        "(`engine/evict.py:compact_layer`, formerly `engine/step.py:_compact`; scoring and the "
        "paged reads/writes run under it); *per-step* = other ops launched directly by plugin "
        "code; *model* = the rest. `budgeted - unbudgeted` is the plugin's whole cost as the "
        "engine sees it, a check on the stack attribution.",
        "",
        "An older checkout is measured from a worktree holding a copy of this script, run with "
        "the worktree as the working directory (the current directory comes first on "
        "`sys.path`, so `PYTHONPATH` alone would not win over `/work/main`): `git worktree add "
        "<dir> <commit>; cp benchmarks/op_count.py <dir>/benchmarks/; cd <dir>; "
        "PYTHONPATH=<dir> python -m benchmarks.op_count --label before ...`; the run "
        "records the plugin folder it imported. Per-step vLLM work is the same in both "
        "(model ops/token identical), so the plugin's rows compare directly.",
        "",
    ]
    return "\n".join(lines)


def plot(m: dict, out_dir: Path, tag: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = m["results"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    pairs = [(r, run) for r in rs for run in r["runs"]]
    names = [f"{r['label']}\n{run}" for r, run in pairs]
    bottom = [0.0] * len(names)
    colors = {"model": "lightgrey", "per_step": "tab:blue", "eviction": "tab:orange"}
    for cat in CATEGORIES:
        vals = [r["runs"][run]["per_token"][cat] for r, run in pairs]
        a1.bar(names, vals, bottom=bottom, label=cat, color=colors[cat])
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    a1.set_ylabel("top-level torch ops / generated token")
    a1.legend()
    a1.grid(alpha=0.3, axis="y")
    labels = [r["label"] for r in rs]
    ev = [r["runs"]["budgeted"]["per_token"]["eviction"] for r in rs]
    st = [r["runs"]["budgeted"]["per_token"]["per_step"] for r in rs]
    x = range(len(rs))
    a2.bar([i - 0.2 for i in x], st, 0.4, label="per-step", color="tab:blue")
    a2.bar([i + 0.2 for i in x], ev, 0.4, label="eviction", color="tab:orange")
    for i, r in enumerate(rs):
        a2.annotate(f"{r['runs']['budgeted']['evictions']} evictions", (i + 0.2, ev[i]),
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
    a2.set_xticks(list(x), labels)
    a2.set_ylabel("plugin ops / generated token")
    a2.legend()
    a2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = Path(out_dir) / f"{tag}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.op_count", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--policy", default="caote-snapkv")
    p.add_argument("--budget", type=int, default=264)
    p.add_argument("--output-tokens", type=int, default=768)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--requests", type=int, default=1)
    p.add_argument("--no-baseline", action="store_true", help="skip the unbudgeted run")
    p.add_argument("--chunk-steps", type=int, default=32, help="engine steps per profiler session")
    p.add_argument("--out", help="output folder (default benchmarks/results/<tag>/)")
    p.add_argument("--tag", default="op_count_bs32")
    p.add_argument("--label", default="after")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine these results (before first) into <tag>.{json,md,png}")  # fmt: skip
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = provenance.out_dir(args.out, args.tag)
    if args.merge:
        from benchmarks.eval.common import write_results

        merged = {**merge(args.merge), "provenance": provenance.record("benchmarks.op_count", argv)}
        print(write_results(out, args.tag, merged, render_md, plot))
        return 0
    result = measure(args)
    path = out / f"{args.tag}_{args.label}.json"
    path.write_text(provenance.scrub(json.dumps(result, indent=1, default=str)))
    print(render_md({"results": [result]}))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
