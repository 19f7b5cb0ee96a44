"""Attention-backend plugin: the real kernel, then score-and-compact for marked requests.

For each backend vLLM may pick (``CPU_ATTN`` on vLLM-CPU; ``FLASH_ATTN`` / ``TRITON_ATTN`` on
CUDA) this module builds a subclass whose ``AttentionImpl.forward`` first runs the stock
``forward`` unchanged, then, for every budgeted request in the batch (the per-step
:class:`~vllm_caote.engine.model_runner.StepContext`):

1. records the request's newest queries of this layer in a ring of the observation window;
2. if the scheduler marked it (``evict_to``), scores its cached tokens with the request's policy,
   keeps the top ``evict_to`` per KV head (sinks and the window always kept) and writes them,
   in order, into the first slots of its blocks.

:func:`install` registers the subclasses under vLLM's own names with
``vllm.v1.attention.backends.registry.register_backend``, so vLLM picks them wherever it would
pick the stock backend; ``--attention-backend CUSTOM`` selects the CPU/FlashAttention wrapper
explicitly. Requests without a budget see the stock kernel and nothing else.
"""

from __future__ import annotations

import logging
import time

import torch

from vllm_caote.engine import compaction
from vllm_caote.engine.model_runner import LayerState, RowWork, WorkerEviction, current
from vllm_caote.scoring import get_policy, select_keep

logger = logging.getLogger("vllm_caote.engine")

# stock backend enum name -> class path (K/V packing: compaction.LAYOUT_KIND)
WRAPPED = {
    "CPU_ATTN": "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend",
    "FLASH_ATTN": "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend",
    "TRITON_ATTN": "vllm.v1.attention.backends.triton_attn.TritonAttentionBackend",
}


def _layout(impl, layer, kv_cache: torch.Tensor, kind: str) -> compaction.PagedLayout:
    lay = getattr(impl, "_caote_layout", None)
    if lay is None:
        if kind == "regions":
            lay = compaction.probe_cpu_layout(
                layer.isa,
                kv_cache.dtype,
                kv_cache.shape[2],
                kv_cache.shape[3] // 2,
                str(getattr(impl, "kv_cache_dtype", "auto")),
            )
        else:
            lay = compaction.channels_layout()
        impl._caote_layout = lay
    return lay


def after_attention(impl, layer, query: torch.Tensor, kv_cache: torch.Tensor, kind: str) -> None:
    ev = current()
    if ev is None or ev.step is None:
        return
    if query.shape[0] < ev.step.num_tokens:  # a dummy / profiling pass, not our batch
        return
    ev.step.layers_seen += 1
    name = getattr(layer, "layer_name", None) or str(id(layer))
    layout = None
    for work in ev.step.rows:
        if work.error is not None:
            continue
        # Contained: a failure here costs this request its eviction (the scheduler recomputes
        # it without), never the engine or another request.
        try:
            policy = get_policy(work.plan.policy)
            layout = layout or _layout(impl, layer, kv_cache, kind)
            cache = None
            if policy.stateful:
                cache = _read(layout, kv_cache, work, impl, layer)
                _advance_h2o(ev, work, name, impl, policy, query, cache[2])
            elif policy.needs_queries:
                _record_queries(ev, work, name, query)
            if work.plan.evict_to is None:
                continue
            if ev.skip_compaction is not None and ev.skip_compaction(work.req_id):
                continue
            t0 = time.perf_counter()
            _compact(ev, work, name, impl, layer, policy, layout, kv_cache, cache)
            ev.eviction_seconds.append(time.perf_counter() - t0)
            work.layers_compacted += 1
        except Exception as e:  # noqa: BLE001 - contained per request, reported to the scheduler
            work.error = f"{type(e).__name__} in layer {name}: {e}"
            logger.exception("vllm-caote: eviction of request %s failed", work.req_id)


def _read(layout, kv_cache, work: RowWork, impl, layer):
    """The request's cache as stored and dequantised for scoring: ``(raw_k, raw_v, k, v)``,
    each ``[Hkv, n, d]``."""
    raw_k, raw_v = layout.read(kv_cache, work.block_ids, work.cache_len)
    return (
        raw_k,
        raw_v,
        *compaction.dequantize(raw_k, raw_v, str(getattr(impl, "kv_cache_dtype", "auto")), layer),
    )


def _advance_h2o(ev, work: RowWork, name: str, impl, policy, query, keys) -> None:
    """H2O's running sum, advanced by this step's queries: each query counts exactly once."""
    ls = ev.request(work.req_id).layers.setdefault(name, LayerState())
    q = query[work.q_start : work.q_end].transpose(0, 1)  # [Hq, n, d]
    ls.h2o = policy.advance(q, keys, ls.h2o, scale=getattr(impl, "scale", None))


def _record_queries(ev: WorkerEviction, work: RowWork, name: str, query: torch.Tensor) -> None:
    w = ev.settings.window
    ls = ev.request(work.req_id).layers.setdefault(name, LayerState())
    q = query[work.q_start : work.q_end]  # [n, Hq, d]
    n = q.shape[0]
    if ls.ring is None:
        ls.ring = q.new_zeros(q.shape[1], w, q.shape[2])
    m = min(n, w)
    newest = q[n - m :].transpose(0, 1)  # [Hq, m, d]
    start = (work.seen_before + n - m) % w  # ring slot of the oldest of them
    first = min(m, w - start)  # slices, not index tensors: this runs per layer, per step
    ls.ring[:, start : start + first] = newest[:, :first]
    if first < m:
        ls.ring[:, : m - first] = newest[:, first:]
    ls.recorded += n


def _window_queries(ev: WorkerEviction, work: RowWork, name: str) -> torch.Tensor | None:
    ls = ev.request(work.req_id).layers.get(name)
    if ls is None or ls.ring is None:
        return None
    w = min(ev.settings.window, ls.recorded)  # tokens read from the prefix cache have no query
    total = work.seen_before + (work.q_end - work.q_start)
    order = torch.arange(total - w, total, device=ls.ring.device) % ev.settings.window
    return ls.ring[:, order]


def _compact(ev, work: RowWork, name: str, impl, layer, policy, layout, kv_cache, cache) -> None:
    cfg = ev.settings
    raw_keys, raw_values, keys, values = cache or _read(layout, kv_cache, work, impl, layer)
    ls = ev.request(work.req_id).layers.setdefault(name, LayerState())
    if policy.stateful:
        scores = policy.score_from_state(values, ls.h2o)
    else:
        queries = _window_queries(ev, work, name) if policy.needs_queries else None
        scores, _ = policy.score_with_state(
            keys, values, queries=queries, sinks=cfg.sinks, scale=getattr(impl, "scale", None)
        )
    # the protected head (shared prefix-cache blocks) is kept like sinks, and never written
    head = work.plan.protected
    keep_idx = select_keep(
        scores, work.plan.evict_to, protect_recent=cfg.window, sinks=max(cfg.sinks, head)
    )
    d = raw_keys.shape[-1]
    gather_idx = keep_idx[:, head:].unsqueeze(-1).expand(-1, -1, d)
    # the stored (possibly quantised) bytes move; nothing is re-quantised
    layout.write(
        kv_cache,
        work.block_ids[head // kv_cache.shape[2] :],
        torch.gather(raw_keys, 1, gather_idx),
        torch.gather(raw_values, 1, gather_idx),
    )
    if ls.h2o is not None:
        ls.h2o = torch.gather(ls.h2o, 1, keep_idx.to(ls.h2o.device))


def is_caote_impl(impl) -> bool:
    """True for attention impls built by :func:`make_backend` (the eviction hook runs)."""
    return bool(getattr(type(impl), "_caote_hook", False))


def make_backend(base_path: str, kind: str):
    """A subclass of the stock backend whose impl compacts after the stock forward."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    base = resolve_obj_by_qualname(base_path)
    base_impl = base.get_impl_cls()

    class CaoteImpl(base_impl):  # type: ignore[misc,valid-type]
        _caote_hook = True

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw):
            out = super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw
            )
            if attn_metadata is not None and kv_cache is not None and kv_cache.numel() > 0:
                after_attention(self, layer, query, kv_cache, kind)
            return out

    CaoteImpl.__name__ = CaoteImpl.__qualname__ = f"Caote{base_impl.__name__}"

    class CaoteBackend(base):  # type: ignore[misc,valid-type]
        @staticmethod
        def get_impl_cls():
            return CaoteImpl

    CaoteBackend.__name__ = CaoteBackend.__qualname__ = f"Caote{base.__name__}"
    return CaoteBackend


_BUILT: dict[str, type] = {}
LAYOUT_KIND = {"CPU_ATTN": "regions", "FLASH_ATTN": "channels", "TRITON_ATTN": "channels"}


def __getattr__(name: str):
    # Backends are built lazily (importing FlashAttention on a CPU host would fail):
    # vLLM resolves "vllm_caote.engine.attention.Caote<ENUM>" through this hook.
    if name.startswith("Caote_"):
        enum_name = name[len("Caote_") :]
        if enum_name in WRAPPED:
            if name not in _BUILT:
                _BUILT[name] = make_backend(WRAPPED[enum_name], LAYOUT_KIND[enum_name])
            return _BUILT[name]
    raise AttributeError(name)


def install() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    for enum_name in WRAPPED:
        register_backend(getattr(AttentionBackendEnum, enum_name), f"{__name__}.Caote_{enum_name}")
    try:
        from vllm.platforms import current_platform

        default = "CPU_ATTN" if current_platform.is_cpu() else "FLASH_ATTN"
    except Exception:  # pragma: no cover
        default = "CPU_ATTN"
    register_backend(AttentionBackendEnum.CUSTOM, f"{__name__}.Caote_{default}")
