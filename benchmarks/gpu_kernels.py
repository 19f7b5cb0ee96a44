"""``python -m benchmarks.gpu_kernels``: eviction kernels on a paged cache, torch only.

For a machine with a GPU but without vLLM (or network): one request's KV cache in
FlashAttention's paged layout at Llama-3.1-8B shapes (32 layers, 8 KV heads, 32 query heads,
head 128, bf16), evicted with the plugin's own functions, timed next to one decode attention
over the same cache, and checked against a CPU float32 reference.

One **eviction** of one request is, for each layer, the worker's own per-layer compaction,
:func:`vllm_caote.engine.evict.compact_layer`, called as ``after_attention`` calls it after the stock
attention kernel: gather the request's tokens from its blocks
(:meth:`~vllm_caote.engine.compaction.PagedLayout.read`), score them with the policy against the
window queries, :func:`~vllm_caote.scoring.select_keep` (sinks and the observation window kept)
and write the kept tokens into the first blocks of the request's block table, in place. The
benchmark does not re-implement any of it, so it times whatever the engine runs today;
:class:`EngineEviction` is the only code here that knows ``compact_layer``'s signature (the CI test
fails if it changes). Not timed, as the engine runs them every step, not at an eviction:
recording the window queries, advancing H2O's sum and Expected Attention's query moments.

The cache: vLLM 0.32 views each layer's FlashAttention cache as ``[num_blocks, Hkv, block_size,
2*d]`` (keys and values side by side on the last dim) over memory ordered ``LBNHC``, i.e.
``[layers, num_blocks, block_size, Hkv, 2*d]``; the request's block table is a random subset
of the blocks in random order, so the gather is as scattered as in a long-running server.

The **decode baseline** is ``torch.nn.functional.scaled_dot_product_attention`` of one query
token (all query heads) over the request's whole cache, per layer, over every layer, timed the
same way. It reads contiguous K/V (no gather): a lower bound of a paged decode kernel, so the
ratio ``eviction / decode`` errs against eviction. Two GQA forms are timed (query heads packed
per KV head; ``enable_gqa``); the faster is the baseline.

Correctness: before the timed runs of each (context, budget, policy), the request is evicted on
a freshly filled cache, and for its first and last layers what the cache then holds (read back
from the raw memory, not through the engine's layout code) is compared with the policy run on
CPU float32 copies of the request's tokens (no paging, scoring + ``select_keep`` only): every
compacted token must be an exact copy of a source token (keys and values together, in token
order), the kept indices (recovered from the compacted tokens) must overlap the reference's by
``--min-overlap`` per KV head (identical in float32 on CPU; bf16 on a GPU may flip near-ties),
and every block the eviction must not write must be unchanged.

**Batched** (``--batch-rows``, default 4): per context and policy, that many requests evicting
in the same step through one ``compact_layer`` call per layer (one padded scoring call, as the
engine batches them), timed per layer next to one decode step's attention of the same rows,
with the peak scratch (:mod:`benchmarks.gpu_batched`).

Output: JSON (``--out``, default ``benchmarks/results/gpu_kernels.json``) and a Markdown table next to
it. Exit status 1 when a check fails. ``--tiny`` runs tiny shapes on CPU in seconds (CI).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks import provenance
from benchmarks.gpu_batched import measure_batched
from benchmarks.gpu_reference import Reference, check_eviction, h2o_states, moment_states
from benchmarks.gpu_report import environment, render_md, target_result
from benchmarks.gpu_timing import measure_decode, rounded, timed
from vllm_caote.config import EvictionSettings
from vllm_caote.engine import compaction
from vllm_caote.engine.plan import StepPlan, cdiv
from vllm_caote.scoring import Policy, get_policy, policy_names

DEFAULT_POLICIES = ("caote-snapkv", "snapkv", "caote-tova", "keydiff", "streaming")
LLAMA_8B = {"layers": 32, "kv_heads": 8, "q_heads": 32, "head_size": 128}
TINY = {"layers": 2, "kv_heads": 2, "q_heads": 4, "head_size": 16}
DEFAULT_CONTEXTS = (4096, 16384, 32768)
DEFAULT_BUDGETS = (1024, 2048, 4096)
TINY_CONTEXTS = (256, 512)
TINY_BUDGETS = (64, 128)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TARGET = "eviction < one decode step's attention at Llama-3.1-8B shapes, 32k cache (on a GPU)"


def log(msg: str) -> None:
    print(f"[gpu_kernels] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    q_heads: int
    head_size: int
    dtype: str
    block_size: int
    window: int
    sinks: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def is_llama_8b(self) -> bool:
        return all(getattr(self, k) == v for k, v in LLAMA_8B.items()) and self.dtype == "bfloat16"


# -- the paged cache ---------------------------------------------------------------------------
class PagedRequest:
    """One request of ``context`` tokens in FlashAttention's paged cache, every layer."""

    def __init__(self, shape: Shape, context: int, device: torch.device, seed: int) -> None:
        self.shape, self.context, self.device, self.seed = shape, context, device, seed
        bs, h, d = shape.block_size, shape.kv_heads, shape.head_size
        self.nblk = cdiv(context, bs)
        self.num_blocks = self.nblk + max(1, self.nblk // 4)  # other requests' blocks too
        # vLLM 0.32 (LBNHC): memory [L, B, N, H, 2d]; a layer's view is logical [B, H, N, 2d]
        self.raw = torch.empty(
            shape.layers, self.num_blocks, bs, h, 2 * d, dtype=shape.torch_dtype, device=device
        )
        self.caches = [self.raw[i].permute(0, 2, 1, 3) for i in range(shape.layers)]
        gen = torch.Generator().manual_seed(seed)
        self.block_ids = torch.randperm(self.num_blocks, generator=gen)[: self.nblk].to(device)
        q = torch.randn(shape.layers, shape.q_heads, shape.window, d, generator=gen)
        self.queries = q.to(device=device, dtype=shape.torch_dtype)  # [L, Hq, w, d] the window
        self.layout = compaction.channels_layout()

    def refill(self) -> None:
        """The same random contents every time (a fresh, un-evicted cache)."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed)
        self.raw.normal_(generator=gen)

    def tokens(self, layer: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[Hkv, length, d]`` read from the raw memory: not through
        :class:`~vllm_caote.engine.compaction.PagedLayout` (an independent reading)."""
        n = self.context if length is None else length
        d = self.shape.head_size
        blocks = self.raw[layer].index_select(0, self.block_ids)  # [nblk, bs, H, 2d]
        tok = blocks.reshape(-1, self.shape.kv_heads, 2 * d)[:n].permute(1, 0, 2)
        return tok[..., :d], tok[..., d:]

    def release(self) -> None:
        del self.raw, self.caches, self.queries


# -- the product code path ---------------------------------------------------------------------
class EngineEviction:
    """One request's eviction in every layer through the worker's own per-layer compaction,
    ``engine.evict.compact_layer``, with the state the worker holds when it calls it (the window
    queries, H2O's running sum). The only code here that knows ``compact_layer``'s signature."""

    REQ = "bench-request"

    def __init__(self, req: PagedRequest, policy: Policy, keep: int, settings) -> None:
        from vllm_caote.engine import evict, step  # torch + numpy only (no vLLM at import)

        self.step, self.evict, self.req, self.policy = step, evict, req, policy
        n = req.context
        self.names = [f"model.layers.{i}.self_attn.attn" for i in range(req.shape.layers)]
        # the worker's ring holds [w, Hq, d] per request and hands out a [Hq, w, d] view
        self.window = {
            name: req.queries[i].transpose(0, 1).contiguous() for i, name in enumerate(self.names)
        }
        self.state = step.RequestState()
        self.h2o = dict(zip(self.names, h2o_states(req, policy), strict=True))
        self.moments = dict(zip(self.names, moment_states(req, policy), strict=True))
        no_rope = SimpleNamespace(for_layer=lambda layer: None)  # moments as given, unrotated
        self.ev = SimpleNamespace(
            settings=settings, request=lambda req_id: self.state, rings=self, rope=no_rope
        )
        plan = StepPlan(offset=0, evict_to=keep, policy=policy.name, reset=False)
        # a decode step of the request: one new token, its cache `n` tokens after the KV write
        row = dict(
            req_id=self.REQ, row=0, q_start=0, q_end=1, cache_len=n, seen_before=n - 1,
            block_ids=req.block_ids, plan=plan, policy=policy,
        )  # fmt: skip
        names = {f.name for f in fields(step.RowWork)}
        self.work = step.RowWork(**{k: v for k, v in row.items() if k in names})
        self.impl = SimpleNamespace(scale=None, kv_cache_dtype="auto")

    def window_queries(self, req_id: str, layer: str, total: int) -> torch.Tensor:
        """``QueryRings.window_queries`` of the worker: the last ``w`` queries, ``[Hq, w, d]``."""
        return self.window[layer].transpose(0, 1)

    def __call__(self) -> None:
        step, evict, caches = self.step, self.evict, self.req.caches
        for i, name in enumerate(self.names):
            # the state before this eviction: H2O's sum (it shrinks with it), query moments
            self.state.layers[name] = evict.LayerState(self.h2o[name], self.moments[name])
            rows = [evict.Evicting(self.work, step._HeadSum(None))]
            evict.compact_layer(self.ev, rows, name, self.impl, None, self.req.layout, caches[i])
            if self.work.error is not None:
                raise RuntimeError(self.work.error)


# -- the run -----------------------------------------------------------------------------------
def run(args) -> dict:
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:  # "cuda": the current device (set_device needs an index)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # the events record on the current device's stream
    shape = Shape(
        args.layers,
        args.kv_heads,
        args.q_heads,
        args.head_size,
        args.dtype,
        args.block_size,
        args.window,
        args.sinks,
    )
    settings = EvictionSettings(window=args.window, sinks=args.sinks)
    policies = [get_policy(p) for p in args.policies]
    checked = sorted({0, shape.layers - 1})
    report: dict = {
        "tool": "benchmarks.gpu_kernels",
        "env": environment(device),
        "shape": asdict(shape),
        "args": {k: v for k, v in vars(args).items()},
        "target": TARGET,
        "decode": [],
        "evictions": [],
        "batched": [],
        "skipped": [],
    }
    log(f"{device} {shape}")
    for ctx in args.contexts:
        budgets = [b for b in args.budgets if b < ctx]
        if not budgets:
            continue
        if time.perf_counter() - t_start > args.time_limit:
            report["skipped"].append({"context": ctx, "reason": "time limit"})
            continue
        req = PagedRequest(shape, ctx, device, args.seed + ctx)
        req.refill()
        mib = req.raw.numel() * req.raw.element_size() / 2**20
        log(f"context {ctx}: paged cache {mib:.0f} MiB, {req.nblk} of {req.num_blocks} blocks")
        dec = measure_decode(req, args)
        report["decode"].append(rounded(dec))
        log(f"  decode attention {dec['ms_per_step']:.3f} ms/step ({dec['form']})")
        ref = Reference(req, checked, settings)
        for budget in budgets:
            keep = cdiv(budget, shape.block_size) * shape.block_size  # as the scheduler plans
            for policy in policies:
                if time.perf_counter() - t_start > args.time_limit:
                    report["skipped"].append(
                        {"context": ctx, "budget": budget, "policy": policy.name, "reason": "time limit"}
                    )  # fmt: skip
                    continue
                req.refill()
                refill_same = ref.snapshot()
                before = {layer: req.raw[layer].clone() for layer in checked}
                evict = EngineEviction(req, policy, keep, settings)
                evict()  # the checked eviction, on the fresh cache (also a warmup)
                check = check_eviction(req, ref, policy, keep, before, args.min_overlap)
                check["refill_reproducible"] = bool(refill_same)
                check["passed"] = check["passed"] and check["refill_reproducible"]
                del before
                # the cache is compacted in place again each run: the same work, on contents
                # of the same kind (the first `keep` tokens are some of the same random tokens)
                t = timed(evict, device, args.repeats, args.warmup, args.config_seconds)
                row = {
                    "context": ctx,
                    "budget": budget,
                    "keep": keep,
                    "policy": policy.name,
                    "ms_per_eviction": t["ms"],
                    "ms_per_layer": t["ms"] / shape.layers,
                    "ms_min": t["ms_min"],
                    "repeats": t["repeats"],
                    "decode_ms_per_step": dec["ms_per_step"],
                    "ratio_to_decode": t["ms"] / dec["ms_per_step"],
                    "check": check,
                }
                report["evictions"].append(rounded(row))
                log(
                    f"  budget {budget} {policy.name}: {t['ms']:.3f} ms/eviction "
                    f"({row['ratio_to_decode']:.1f}x decode) check "
                    f"{'ok' if check['passed'] else 'FAILED'} overlap {check['overlap_min']:.4f}"
                )
        del ref
        req.release()
        if args.batch_rows > 1 and time.perf_counter() - t_start <= args.time_limit:
            keep = cdiv(budgets[0], shape.block_size) * shape.block_size
            for policy in policies:  # the engine's batched path: several rows in one call
                b = measure_batched(shape, ctx, policy, keep, settings, device, args)
                report["batched"].append(rounded(b))
                log(
                    f"  {b['rows']} rows {policy.name}: {b['ms_per_layer']:.3f} ms/layer "
                    f"({b['ratio_to_decode']:.1f}x their decode) scratch {b['scratch']}"
                )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    checks = [r["check"] for r in report["evictions"]]
    failures = [
        {k: r[k] for k in ("context", "budget", "policy", "check")}
        for r in report["evictions"]
        if not r["check"]["passed"]
    ]
    failures += [
        {"context": d["context"], "check": "decode forms disagree"}
        for d in report["decode"]
        if not d["forms_agree"]
    ]
    report["correctness"] = {
        "passed": bool(checks) and not failures,
        "checks": len(checks),
        "min_overlap_required": args.min_overlap,
        "overlap_min": min((c["overlap_min"] for c in checks), default=None),
        "indices_equal_all": all(c["indices_equal"] for c in checks),
        "failures": failures,
    }
    report["target_result"] = target_result(report, shape, device)
    report["complete"] = not report["skipped"]
    report["env"]["vllm_imported"] = any(m == "vllm" or m.startswith("vllm.") for m in sys.modules)
    report["wall_s"] = round(time.perf_counter() - t_start, 2)
    return report


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_kernels",
        description="Eviction (gather + score + select + compact) on a paged KV cache vs one "
        "decode attention, torch only; checked against a CPU float32 reference.",
    )
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="tiny shapes on CPU in fp32 (2 layers, 2 KV heads, 4 query heads, head 16, "
        "contexts 256,512, budgets 64,128): seconds, for CI",
    )
    ap.add_argument("--layers", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--q-heads", type=int)
    ap.add_argument("--head-size", type=int)
    ap.add_argument("--contexts", type=_ints, help="cache lengths (default 4096,16384,32768)")
    ap.add_argument(
        "--budgets", type=_ints, help="tokens kept (default 1024,2048,4096; those < context)"
    )
    ap.add_argument(
        "--policies",
        default=",".join(DEFAULT_POLICIES),
        help=f"comma list or 'all' (default {','.join(DEFAULT_POLICIES)}); from {policy_names()}",
    )
    ap.add_argument("--repeats", type=int, help="timed runs (median; default 10, --tiny 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs after the checked one")
    ap.add_argument(
        "--batch-rows", type=int, default=4, help="rows evicting together (batched timing; 0: off)"
    )
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default bfloat16 (--tiny: float32)")
    ap.add_argument("--window", type=int, default=EvictionSettings.window)
    ap.add_argument("--sinks", type=int, default=EvictionSettings.sinks)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-overlap", type=float, default=0.99)
    ap.add_argument(
        "--time-limit",
        type=float,
        default=210.0,
        help="seconds after which no new configuration starts (default 210: the default grid "
        "stays under 5 minutes)",
    )
    ap.add_argument(
        "--config-seconds",
        type=float,
        default=4.0,
        help="stop repeating a configuration after this many seconds of timed runs",
    )
    ap.add_argument(
        "--out",
        type=Path,
        help="JSON path (default benchmarks/results/gpu_kernels[_tiny]/gpu_kernels[_tiny].json)",
    )
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    base = TINY if args.tiny else LLAMA_8B
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.contexts is None:
        args.contexts = list(TINY_CONTEXTS if args.tiny else DEFAULT_CONTEXTS)
    if args.budgets is None:
        args.budgets = list(TINY_BUDGETS if args.tiny else DEFAULT_BUDGETS)
    if args.repeats is None:
        args.repeats = 3 if args.tiny else 10
    if args.dtype is None:
        args.dtype = "float32" if args.tiny else "bfloat16"
    if args.out is None:
        name = "gpu_kernels_tiny" if args.tiny else "gpu_kernels"
        args.out = provenance.RESULTS / name / f"{name}.json"
    if args.policies.strip().lower() == "all":
        args.policies = policy_names()
    else:
        args.policies = [get_policy(p).name for p in args.policies.split(",") if p.strip()]
    if args.q_heads % args.kv_heads:
        ap.error(f"--q-heads {args.q_heads} must be a multiple of --kv-heads {args.kv_heads}")
    low = args.window + args.sinks
    if any(b < low for b in args.budgets):
        ap.error(f"budgets must be >= window + sinks = {low}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device (use --device cpu)")
    if (
        args.device == "cpu"
        and not args.tiny
        and args.layers * args.kv_heads * args.head_size > 8192
    ):
        log("CPU at large shapes is slow: it proves correctness, not GPU speed (try --tiny)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prov = provenance.record("benchmarks.gpu_kernels", argv)
    report = run(args)
    report["provenance"] = prov
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    args_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in report["args"].items()}
    report["args"] = args_json
    out.write_text(provenance.scrub(json.dumps(report, indent=1)) + "\n")
    out.with_suffix(".md").write_text(provenance.scrub(render_md(report)))
    cor = report["correctness"]
    log(
        f"wrote {out} and {out.with_suffix('.md')} in {report['wall_s']} s; correctness "
        f"{'passed' if cor['passed'] else 'FAILED'}"
    )
    if not cor["passed"]:
        for f in cor["failures"]:
            log(f"  failed: {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
