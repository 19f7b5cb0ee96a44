"""Timing for :mod:`benchmarks.gpu_kernels`: device-timeline clocks, and the decode
attention baseline an eviction is compared with."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from benchmarks.gpu_kernels import PagedRequest


# -- timing ------------------------------------------------------------------------------------
class Clock:
    """Start and stop on the device's timeline: CUDA events, or ``perf_counter`` on CPU (whose
    ops are synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def time_ms(self, fn: Callable[[], None]) -> float:
        start = self._now()
        fn()
        stop = self._now()
        if self.cuda:
            torch.cuda.synchronize()
            return start.elapsed_time(stop)
        return (stop - start) * 1e3


def timed(fn: Callable[[], None], device, repeats: int, warmup: int, seconds: float) -> dict:
    """Median of ``repeats`` runs after ``warmup`` (fewer repeats once ``seconds`` of timed
    runs have passed: big shapes stay within the time guard)."""
    clock = Clock(device)
    for _ in range(warmup):
        clock.time_ms(fn)
    totals: list[float] = []
    t0 = time.perf_counter()
    for _ in range(repeats):
        totals.append(clock.time_ms(fn))
        if time.perf_counter() - t0 > seconds:
            break
    return {
        "ms": statistics.median(totals),
        "ms_min": min(totals),
        "ms_all": totals,
        "repeats": len(totals),
    }


# -- decode baseline ---------------------------------------------------------------------------
def _decode_packed(q, k, v):
    # one token, every query head: GQA packs the G heads of a KV head as G queries (FA pack_gqa)
    hq, d = q.shape
    hkv = k.shape[1]
    return F.scaled_dot_product_attention(q.view(1, hkv, hq // hkv, d), k, v).reshape(hq, d)


def _decode_gqa(q, k, v):
    hq, d = q.shape
    out = F.scaled_dot_product_attention(q.view(1, hq, 1, d), k, v, enable_gqa=True)
    return out.reshape(hq, d)


DECODE_FORMS = {"packed": _decode_packed, "enable_gqa": _decode_gqa}


def measure_decode(req: PagedRequest, args) -> dict:
    """One decode step's attention over the request's full cache, every layer."""
    shape = req.shape
    kv = []
    for layer in range(shape.layers):
        k, v = req.tokens(layer)
        kv.append((k.contiguous().unsqueeze(0), v.contiguous().unsqueeze(0)))
    gen = torch.Generator().manual_seed(args.seed + 1)
    qs = torch.randn(shape.layers, shape.q_heads, shape.head_size, generator=gen)
    qs = qs.to(device=req.device, dtype=shape.torch_dtype)
    out: dict = {"context": req.context, "forms": {}}
    ref = None
    for name, fn in DECODE_FORMS.items():
        try:
            o = fn(qs[0], *kv[0])
        except (RuntimeError, TypeError) as e:  # a torch without this form
            out["forms"][name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        if ref is None:
            ref = o.float()
        agree = torch.allclose(o.float(), ref, atol=2e-2, rtol=2e-2)

        def step(fn=fn):
            for layer in range(shape.layers):
                fn(qs[layer], *kv[layer])

        t = timed(step, req.device, args.repeats, args.warmup, args.config_seconds)
        out["forms"][name] = {**rounded(t), "agrees": bool(agree)}
    ok = {n: f for n, f in out["forms"].items() if "ms" in f}
    best = min(ok, key=lambda n: ok[n]["ms"])
    out.update(
        form=best,
        ms_per_step=ok[best]["ms"],
        ms_per_layer=ok[best]["ms"] / shape.layers,
        forms_agree=all(f["agrees"] for f in ok.values()),
    )
    return out


def rounded(d: dict) -> dict:
    """``d`` with floats (also in lists and nested dicts) rounded to 4 places, for the JSON."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float):
            out[k] = round(v, 4)
        elif isinstance(v, list):
            out[k] = [round(x, 4) if isinstance(x, float) else x for x in v]
        elif isinstance(v, dict):
            out[k] = rounded(v)
        else:
            out[k] = v
    return out
