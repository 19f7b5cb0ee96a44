"""Attention-backend plugin: the real kernel, then score-and-compact for marked requests.

For each backend vLLM may pick (``CPU_ATTN`` on vLLM-CPU; ``FLASH_ATTN`` / ``TRITON_ATTN`` on
CUDA) this module builds a subclass whose ``AttentionImpl.forward`` first runs the stock
``forward`` unchanged, then, for every budgeted request in the batch (the per-step
:class:`~vllm_caote.engine.step.StepContext`):

1. records the request's newest queries of this layer in a ring of the observation window;
2. if the scheduler marked it (``evict_to``), scores its cached tokens with the request's policy,
   keeps the top ``evict_to`` per KV head (sinks and the window always kept) and writes them,
   in order, into the first slots of its blocks.

Both are :func:`vllm_caote.engine.step.after_attention`; this module only wraps the backends.

:func:`install` registers the subclasses under vLLM's own names with
``vllm.v1.attention.backends.registry.register_backend``, so vLLM picks them wherever it would
pick the stock backend; ``--attention-backend CUSTOM`` selects the CPU/FlashAttention wrapper
explicitly. Requests without a budget see the stock kernel and nothing else.
"""

from __future__ import annotations

from vllm_caote.engine.step import after_attention

# stock backend enum name -> class path (K/V packing: compaction.LAYOUT_KIND)
WRAPPED = {
    "CPU_ATTN": "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend",
    "FLASH_ATTN": "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend",
    "TRITON_ATTN": "vllm.v1.attention.backends.triton_attn.TritonAttentionBackend",
}


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
