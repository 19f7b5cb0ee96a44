"""What KV eviction supports, checked at engine startup; everything else is refused by name.

Config-level refusals (flags: pipeline parallelism, speculative decoding, ...) live in
:mod:`vllm_caote.configure`, which runs while vLLM builds its config. The checks here need what
only the engine knows at startup: the KV-cache groups and specs (scheduler: several groups, MLA,
sliding-window / chunked-local layers, also when vLLM keeps them on full-attention blocks,
non-causal prefix-LM layers) and
what the runner built (worker: KV sharing, ALiBi, unwrapped attention backends, kernel blocks
split from the manager's). Each raises with the feature named and the way out.
"""

from __future__ import annotations


class UnsupportedModelError(RuntimeError):
    """The model's KV cache cannot be evicted; the message names the feature."""


def check_kv_cache_config(kv_cache_config) -> None:
    """Eviction compacts one full-attention block table per request; refuse anything else."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) > 1:
        kinds = sorted({type(g.kv_cache_spec).__name__ for g in groups})
        raise UnsupportedModelError(
            f"vllm-caote: this model has {len(groups)} KV-cache groups ({', '.join(kinds)}: "
            "sliding-window / hybrid attention); KV eviction supports one full-attention group. "
            "Serve it without the plugin (CAOTE_DISABLE=1)."
        )
    for g in groups:
        spec = g.kv_cache_spec
        if isinstance(spec, MLAAttentionSpec):
            raise UnsupportedModelError(
                "vllm-caote: multi-head latent attention (MLA) KV caches are not supported by "
                "KV eviction. Serve this model without the plugin (CAOTE_DISABLE=1)."
            )
        if type(spec) is not FullAttentionSpec:
            raise UnsupportedModelError(
                f"vllm-caote: KV-cache spec {type(spec).__name__} (sliding-window, chunked-local "
                "or sink attention, or layers of different KV shapes in one group) is not "
                "supported by KV eviction; only full attention is. Serve this model without the "
                "plugin (CAOTE_DISABLE=1)."
            )
        if getattr(spec, "non_causal", False):
            # Prefix-LM layers (vLLM's PrefillPrefixLMAttention, e.g. HRM-Text) attend
            # bidirectionally over the prompt: scores and the block-wise chunk evictions assume
            # each token sees only the cache before it.
            raise UnsupportedModelError(
                "vllm-caote: this model has non-causal (prefix-LM) attention layers; KV eviction "
                "scores and compacts a causal cache only. Serve this model without the plugin "
                "(CAOTE_DISABLE=1)."
            )
        # With the hybrid KV-cache manager off (--disable-hybrid-kv-cache-manager, or vLLM's
        # own choice, e.g. for chunked-local models or connectors), vLLM keeps a mixed model's
        # local layers on full-attention blocks and records their window in the spec
        # (kv_cache_utils._promote_local_kv_cache_specs); they still attend over a window of
        # cache positions, which compaction would shift.
        for what, size in (
            ("sliding-window attention (window", getattr(spec, "sliding_window", None)),
            ("chunked-local attention (chunk", getattr(spec, "attention_chunk_size", None)),
        ):
            if size is not None:
                raise UnsupportedModelError(
                    f"vllm-caote: this model has {what} {size} tokens) in layers vLLM keeps on "
                    "full-attention blocks (the hybrid KV-cache manager is off); their window "
                    "is counted in cache positions, which KV eviction would shift. It is not "
                    "supported with or without --disable-hybrid-kv-cache-manager. Serve this "
                    "model without the plugin (CAOTE_DISABLE=1)."
                )


class UnsupportedLayerError(RuntimeError):
    """An attention layer eviction cannot compact correctly; the message names it."""


def check_attention_layers(runner, kv_cache_config) -> int:
    """Every KV-cache layer must run the plugin's attention hook on a plain, unshared cache,
    addressed in the KV manager's own blocks.

    Returns the number of layers of ``kv_cache_config`` (each must confirm a compaction before
    blocks are freed).
    """
    from vllm_caote.engine.attention import is_caote_impl

    # vLLM's runner works on a deep copy of ``kv_cache_config`` to which it adds the layers
    # that read another layer's cache (``add_kv_sharing_layers_to_kv_cache_groups``): only
    # that copy, or ``shared_kv_cache_layers``, names them.
    shared = dict(getattr(runner, "shared_kv_cache_layers", None) or {})
    if shared:
        name, target = next(iter(shared.items()))
        raise UnsupportedLayerError(
            f"vllm-caote: layer {name} reads layer {target}'s KV cache (KV sharing, "
            f"{len(shared)} such layer(s)); KV eviction does not support it. Serve this model "
            "without the plugin (CAOTE_DISABLE=1)."
        )
    ctx = runner.vllm_config.compilation_config.static_forward_context
    names = [n for g in kv_cache_config.kv_cache_groups for n in g.layer_names]
    runner_config = getattr(runner, "kv_cache_config", None) or kv_cache_config
    checked = list(
        dict.fromkeys(names + [n for g in runner_config.kv_cache_groups for n in g.layer_names])
    )
    for name in checked:
        layer = ctx.get(name)
        impl = getattr(layer, "impl", None)
        if impl is None:
            continue
        target = getattr(layer, "kv_sharing_target_layer_name", None) or getattr(
            impl, "kv_sharing_target_layer_name", None
        )
        if target:
            raise UnsupportedLayerError(
                f"vllm-caote: layer {name} reads layer {target}'s KV cache (KV sharing); "
                "KV eviction does not support it. Serve this model without the plugin "
                "(CAOTE_DISABLE=1)."
            )
        if getattr(impl, "alibi_slopes", None) is not None:
            raise UnsupportedLayerError(
                f"vllm-caote: layer {name} uses ALiBi position biases, which are computed from "
                "cache indices; compaction would shift them. Serve this model without the "
                "plugin (CAOTE_DISABLE=1)."
            )
        if not is_caote_impl(impl):
            raise UnsupportedLayerError(
                f"vllm-caote: layer {name} runs attention backend {type(impl).__name__}, which "
                "the plugin does not wrap (supported: CPU_ATTN, FLASH_ATTN, TRITON_ATTN). Pick "
                "one with --attention-backend, or serve without the plugin (CAOTE_DISABLE=1)."
            )
    _check_kernel_blocks(runner, kv_cache_config)
    return len(names)


def _check_kernel_blocks(runner, kv_cache_config) -> None:
    """The attention kernels must address the KV manager's blocks, not blocks split from them.

    When a backend supports only blocks smaller than the manager's (``--block-size``, or one
    vLLM picked), vLLM splits each manager block into kernel blocks: the runner's
    ``_kernel_block_sizes`` and each ``AttentionGroup.kernel_block_size`` say so, the layers'
    caches are viewed in kernel blocks and the block tables are remapped to kernel-block ids
    (``vllm.v1.worker.utils.AttentionGroup``, ``prepare_kernel_block_sizes``). Compaction
    writes manager blocks through the manager's block table, so it would address the wrong
    rows.
    """
    groups = kv_cache_config.kv_cache_groups
    kernel_sizes = list(getattr(runner, "_kernel_block_sizes", None) or [])
    attn_groups = list(getattr(runner, "attn_groups", None) or [])
    input_batch = getattr(runner, "input_batch", None)
    tables = list(getattr(getattr(input_batch, "block_table", None), "block_tables", None) or [])
    for gid, group in enumerate(groups):
        manager = group.kv_cache_spec.block_size
        found = [
            (f"attention backend {ag.backend.get_name()}", ag.kernel_block_size)
            for ag in (attn_groups[gid] if gid < len(attn_groups) else ())
            if ag.kernel_block_size is not None
        ]
        if gid < len(kernel_sizes):
            found.append(("the runner's kernel block sizes", kernel_sizes[gid]))
        if gid < len(tables):
            found.append(("the runner's block table", tables[gid].block_size))
        for where, size in found:
            if size != manager:
                raise UnsupportedLayerError(
                    f"vllm-caote: KV-cache group {gid} runs in {size}-token kernel blocks "
                    f"({where}), split from the KV-cache manager's {manager}-token blocks "
                    "(--block-size); KV eviction compacts whole manager blocks. Start with "
                    f"--block-size {size}, or serve without the plugin (CAOTE_DISABLE=1)."
                )
