"""Attention weights of a window of queries over the cached keys (GQA-aware)."""

from __future__ import annotations

import math

import torch

from ._util import as_compute, check_float, check_rank, compute_dtype


def attention_weights(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Softmax attention of ``w`` queries over ``n`` cached keys, grouped per KV head.

    Args:
        queries: ``[Hq, w, d]`` with ``Hq = Hkv * G``. Query head ``h`` reads KV head
            ``h // G`` (the vLLM / Hugging Face ``repeat_kv`` convention).
        keys: ``[Hkv, n, d]``.
        scale: logit scale; ``None`` means ``1 / sqrt(d)``.
        causal: if True, the queries are those of the *last* ``w`` cached tokens:
            query ``i`` sits at key index ``n - w + i`` and sees keys ``0 .. n - w + i``
            only. Requires ``n >= w``. If False every query sees every key.

    Returns:
        ``A`` of shape ``[Hkv, G, w, n]``, float32 (float64 if an input is float64).
        Invariants: ``A >= 0``; every row ``A[h, g, i, :]`` sums to 1; with
        ``causal=True``, ``A[..., i, j] == 0`` for ``j > n - w + i``.
    """
    check_rank("queries", queries, 3, "[Hq, w, d]")
    check_rank("keys", keys, 3, "[Hkv, n, d]")
    check_float("queries", queries)
    check_float("keys", keys)
    hq, w, d = queries.shape
    hkv, n, dk = keys.shape
    if dk != d:
        raise ValueError(f"head_dim mismatch: queries d={d}, keys d={dk}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"Hq={hq} must be a positive multiple of Hkv={hkv}")
    if causal and n < w:
        raise ValueError(
            f"causal attention needs n >= w (queries are the last w keys); n={n}, w={w}"
        )
    g = hq // hkv
    dt = compute_dtype(queries, keys)
    q = as_compute(queries, dt).reshape(hkv, g, w, d)
    k = as_compute(keys, dt)
    s = (1.0 / math.sqrt(d)) if scale is None else float(scale)
    logits = torch.einsum("hgwd,hnd->hgwn", q, k).mul_(s)
    if causal and w > 1:
        # query i is token n-w+i: it must not see keys after itself, all of which lie in the
        # last w columns (masking only those: the window is small, the cache is not)
        later = torch.ones(w, w, dtype=torch.bool, device=keys.device).triu_(1)
        logits[..., n - w :].masked_fill_(later, float("-inf"))
    return torch.softmax(logits, dim=-1)
