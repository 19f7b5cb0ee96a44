"""Paged-cache reads and compaction (engine/compaction.py) against vLLM's own cache writer.

Tokens are written into a CPU_ATTN cache by vLLM's ``cpu_attn_reshape_and_cache`` kernel (the
op the backend's ``do_kv_cache_update`` calls), exactly as the CPU backend views the cache; the
layout learnt by probing must read them back bit for bit, and a compaction written by
``PagedLayout.write`` must read back as the kept tokens, in order, without touching other
requests' blocks.
"""

from __future__ import annotations

import pytest
import torch

from vllm_caote.engine import compaction

H, D = 3, 64


def _write_with_vllm(kv_cache, keys, values, slots, isa):
    """What CPUAttentionBackendImpl.do_kv_cache_update does, for tokens [n, H, d]."""
    from vllm import _custom_ops as ops

    nb, h, bs, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(nb, h, bs * 2, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        keys, values, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
        kv_cache_dtype="auto",
    )  # fmt: skip


def _isas():
    # the x86 kernels every vLLM-CPU build has (AMX needs the hardware; ARM has "neon")
    import platform

    return ["vec", "vec16"] if platform.machine() in ("x86_64", "AMD64") else ["neon"]


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs", [32, 128])
def test_cpu_layout_reads_vllm_writes_and_compacts(isa, dtype, bs):
    pytest.importorskip("vllm._custom_ops")
    gen = torch.Generator().manual_seed(bs)
    num_blocks, blocks = 12, torch.tensor([7, 2, 9])
    n = 2 * bs + bs // 2 + 3  # a partly filled last block
    keys = torch.randn(n, H, D, generator=gen).to(dtype)
    values = torch.randn(n, H, D, generator=gen).to(dtype)
    slots = (blocks.repeat_interleave(bs)[:n] * bs + torch.arange(n) % bs).to(torch.int64)
    kv = torch.randn(num_blocks, H, bs, 2 * D, generator=gen).to(dtype)
    _write_with_vllm(kv, keys, values, slots, isa)
    others = [b for b in range(num_blocks) if b not in blocks.tolist()]
    untouched = kv[others].clone()

    layout = compaction.probe_cpu_layout(isa, dtype, bs, D)
    if isa == "vec":  # keys transposed per block, values as tokens (what the probe found)
        assert (layout.key_order, layout.value_order) == ("channels", "tokens")
    k, v = layout.read(kv, blocks, n)
    assert torch.equal(k, keys.transpose(0, 1)) and torch.equal(v, values.transpose(0, 1))

    # keep a different subset per head, as eviction does
    keep = bs + 5
    idx = torch.stack([torch.randperm(n, generator=gen)[:keep].sort().values for _ in range(H)])
    gi = idx.unsqueeze(-1).expand(-1, -1, D)
    kept_k, kept_v = torch.gather(k, 1, gi), torch.gather(v, 1, gi)
    layout.write(kv, blocks, kept_k, kept_v)
    k2, v2 = layout.read(kv, blocks, keep)
    assert torch.equal(k2, kept_k) and torch.equal(v2, kept_v)
    assert torch.equal(kv[others], untouched), "compaction wrote outside the request's blocks"

    # the generic permutation path gives the same result as the fast path
    generic = compaction.PagedLayout("regions", layout.key_perm, layout.value_perm)
    k3, v3 = generic.read(kv, blocks, keep)
    assert torch.equal(k3, kept_k) and torch.equal(v3, kept_v)
    generic.write(kv, blocks, kept_k.flip(1), kept_v.flip(1))
    k4, v4 = layout.read(kv, blocks, keep)
    assert torch.equal(k4, kept_k.flip(1)) and torch.equal(v4, kept_v.flip(1))


def test_channels_layout_roundtrip():
    """FlashAttention / Triton packing ``[num_blocks, H, bs, 2d]`` (keys | values per token)."""
    bs, n = 16, 40
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(10, H, bs, 2 * D, generator=gen)
    blocks = torch.tensor([4, 1, 8])
    lay = compaction.channels_layout()
    k, v = lay.read(kv, blocks, n)
    flat = kv[blocks].permute(1, 0, 2, 3).reshape(H, -1, 2 * D)[:, :n]
    assert torch.equal(k, flat[..., :D]) and torch.equal(v, flat[..., D:])
    before = kv.clone()
    lay.write(kv, blocks, k[:, ::2].contiguous(), v[:, ::2].contiguous())
    k2, v2 = lay.read(kv, blocks, 20)
    assert torch.equal(k2, k[:, ::2]) and torch.equal(v2, v[:, ::2])
    others = [b for b in range(10) if b not in blocks.tolist()]
    assert torch.equal(kv[others], before[others])


def test_fp8_window_queries_are_scored_dequantised_with_the_layers_q_scale():
    """With an fp8 KV cache, FlashAttention / Triton get ``q / q_scale`` in fp8 from vLLM's
    ``Attention`` layer; the window queries must be scored as ``q``, not as the fp8 bytes."""
    from types import SimpleNamespace

    from vllm_caote.scoring import attention_weights

    g = torch.Generator().manual_seed(3)
    q = torch.randn(6, 16, 64, generator=g)  # [Hq, w, d]
    k = torch.randn(2, 80, 64, generator=g)  # [Hkv, n, d]
    scale = 0.25  # a non-unit q_scale: the fp8 values are 4x the real ones
    layer = SimpleNamespace(_q_scale=torch.tensor(scale), _q_scale_float=scale)
    q_fp8 = (q / scale).to(torch.float8_e4m3fn)

    dq = compaction.dequantize_queries(q_fp8, layer)
    assert dq.dtype == torch.float32
    torch.testing.assert_close(dq, q, atol=0.15, rtol=0.07)  # fp8's own rounding
    want = attention_weights(q, k)
    got = attention_weights(dq, k)
    raw = attention_weights(q_fp8.float(), k)  # what scoring the bytes as they are gives
    err, raw_err = (got - want).abs().max(), (raw - want).abs().max()
    assert err < 0.05 and raw_err > 4 * err, (float(err), float(raw_err))
    # the q_scale buffer alone (no cached float) is read too; model-dtype queries pass through
    only_buffer = SimpleNamespace(_q_scale=torch.tensor(scale))
    torch.testing.assert_close(compaction.dequantize_queries(q_fp8, only_buffer), dq)
    assert compaction.dequantize_queries(q, layer) is q
