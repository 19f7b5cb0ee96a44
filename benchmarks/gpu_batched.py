"""The batched eviction of :mod:`benchmarks.gpu_kernels`: several requests evicting in
the same step, scored together in each layer as the engine does it.

:class:`BatchedEviction` is ``rows`` requests of ``context`` tokens each, their blocks shuffled
through one layer's paged cache, compacted by one call of the worker's own
:func:`vllm_caote.engine.evict.compact_layer` with every row (one padded
:func:`~vllm_caote.scoring.score_rows` call per policy, then each row's selection and write).
It is timed per layer next to one decode step's attention of the same rows over the same
layer (SDPA, query heads packed per KV head, contiguous K/V), and its peak scratch is reported:
on CUDA the ``torch.cuda.max_memory_allocated`` rise over one eviction of the layer; on CPU the
stated bound of :mod:`vllm_caote.scoring.chunking` (per-chunk scratch, plus the score-sized
``Hq x n`` float32 per row).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks.gpu_timing import timed
from vllm_caote.scoring import chunking


class BatchedEviction:
    """``rows`` requests of ``context`` tokens, one layer, all evicting to ``keep`` together."""

    def __init__(self, shape, context: int, rows: int, policy, keep: int, settings, device, seed):
        from benchmarks.gpu_kernels import EngineEviction, PagedRequest
        from vllm_caote.engine import evict, step

        self.evict, self.step, self.context, self.rows = evict, step, context, rows
        self.shape = replace(shape, layers=1)
        # one layer's cache holding every row's blocks (and some of other requests)
        self.req = PagedRequest(self.shape, context * rows, device, seed)
        self.req.refill()
        per_row = self.req.nblk // rows
        self.engines = []
        for i in range(rows):
            view = SimpleNamespace(
                shape=self.shape,
                context=context,
                block_ids=self.req.block_ids[i * per_row : (i + 1) * per_row],
                queries=self.req.queries,
                layout=self.req.layout,
                caches=self.req.caches,
            )
            eng = EngineEviction(view, policy, keep, settings)
            eng.work.req_id = f"bench-row-{i}"
            self.engines.append(eng)
        by_id = {e.work.req_id: e for e in self.engines}
        self.name = self.engines[0].names[0]
        self.ev = SimpleNamespace(
            settings=settings,
            request=lambda req_id: by_id[req_id].state,
            rings=SimpleNamespace(
                window_queries=lambda req_id, layer, total: by_id[req_id].window_queries(
                    req_id, layer, total
                )
            ),
            rope=self.engines[0].ev.rope,
        )
        self.impl = self.engines[0].impl

    def __call__(self) -> None:
        items = []
        for eng in self.engines:
            # each row's state before this eviction (H2O's sum shrinks with it)
            eng.work.error = None
            eng.state.layers[self.name] = self.evict.LayerState(
                eng.h2o[self.name], eng.moments[self.name]
            )
            items.append(self.evict.Evicting(eng.work, self.step._HeadSum(None)))
        self.evict.compact_layer(
            self.ev, items, self.name, self.impl, None, self.req.layout, self.req.caches[0]
        )
        for eng in self.engines:
            if eng.work.error is not None:
                raise RuntimeError(eng.work.error)

    def decode(self):
        """One decode step's attention of the same rows over this layer (packed GQA SDPA)."""
        s = self.shape
        k, v = self.req.tokens(0, self.context * self.rows)  # [Hkv, rows * n, d]
        split = (s.kv_heads, self.rows, self.context, s.head_size)
        k = k.reshape(split).transpose(0, 1).contiguous()  # [rows, Hkv, n, d]
        v = v.reshape(split).transpose(0, 1).contiguous()
        gen = torch.Generator().manual_seed(1)
        q = torch.randn(self.rows, s.kv_heads, s.q_heads // s.kv_heads, s.head_size, generator=gen)
        q = q.to(device=k.device, dtype=k.dtype)
        return lambda: F.scaled_dot_product_attention(q, k, v)

    def peak_scratch(self) -> dict:
        """Peak scratch of one eviction of the layer: measured on CUDA, the bound on CPU."""
        s = self.shape
        bound = chunking.chunk_scratch_bytes(s.q_heads, s.kv_heads, s.head_size, s.window)
        score_sized = 4 * s.q_heads * self.context * self.rows
        out = {"bound_bytes": bound + score_sized, "chunk_bound_bytes": bound}
        if self.req.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self()
            torch.cuda.synchronize()
            out["measured_bytes"] = torch.cuda.max_memory_allocated() - base
        return out

    def release(self) -> None:
        self.req.release()
        self.engines.clear()


def measure_batched(shape, ctx, policy, keep, settings, device, args) -> dict:
    """Timing and scratch of ``args.batch_rows`` rows of ``ctx`` tokens evicting together in
    one layer, next to one decode step's attention of the same rows over that layer."""
    batch = BatchedEviction(
        shape, ctx, args.batch_rows, policy, keep, settings, device, args.seed + 7 * ctx
    )
    try:
        batch()  # warm up (and fail early, contained to this row of the report)
        scratch = batch.peak_scratch()
        t = timed(batch, device, args.repeats, args.warmup, args.config_seconds)
        d = timed(batch.decode(), device, args.repeats, args.warmup, args.config_seconds)
    finally:
        batch.release()
    return {
        "context": ctx,
        "rows": args.batch_rows,
        "keep": keep,
        "policy": policy.name,
        "ms_per_layer": t["ms"],
        "ms_min": t["ms_min"],
        "repeats": t["repeats"],
        "decode_ms_per_layer": d["ms"],
        "ratio_to_decode": t["ms"] / d["ms"],
        "scratch": scratch,
    }
