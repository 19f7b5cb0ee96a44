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
    *,
    key_lengths: torch.Tensor | None = None,
    query_lengths: torch.Tensor | None = None,
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
        key_lengths, query_lengths: padded batch (see below), LongTensors of the leading
            shape, on the inputs' device; None = every slot is real.

    Leading batch dims: ``queries [*B, Hq, w, d]`` and ``keys [*B, Hkv, n, d]`` give
    ``[*B, Hkv, G, w, n]``, each row computed as on its own. With ``key_lengths`` row ``b``
    has ``key_lengths[b]`` real keys, padded on the right; padded keys get weight 0 (masked
    to ``-inf`` before the softmax). With ``query_lengths`` row ``b``'s real queries are
    its *last* ``query_lengths[b]`` slots (padded on the left, so ``[..., -1, :]`` is
    always the newest query); padded query rows come out all 0. Causal masking uses each
    row's own lengths: real query ``i`` of row ``b`` sees keys ``0 .. n_b - w_b + i``. The
    caller must ensure ``n_b >= w_b`` (not checked: it would sync the device).

    Returns:
        ``A`` of shape ``[Hkv, G, w, n]``, float32 (float64 if an input is float64).
        Invariants: ``A >= 0``; every row ``A[h, g, i, :]`` sums to 1; with
        ``causal=True``, ``A[..., i, j] == 0`` for ``j > n - w + i``.
    """
    if queries.dim() < 3:
        raise ValueError(f"queries must have shape [Hq, w, d], got {tuple(queries.shape)}")
    if keys.dim() != queries.dim():
        check_rank("keys", keys, queries.dim(), "[Hkv, n, d] (same leading dims as queries)")
    check_float("queries", queries)
    check_float("keys", keys)
    lead = queries.shape[:-3]
    if keys.shape[:-3] != lead:
        raise ValueError(
            f"leading dims differ: queries {tuple(queries.shape)}, keys {tuple(keys.shape)}"
        )
    hq, w, d = queries.shape[-3:]
    hkv, n, dk = keys.shape[-3:]
    if dk != d:
        raise ValueError(f"head_dim mismatch: queries d={d}, keys d={dk}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"Hq={hq} must be a positive multiple of Hkv={hkv}")
    padded = key_lengths is not None or query_lengths is not None
    if causal and n < w and not padded:
        raise ValueError(
            f"causal attention needs n >= w (queries are the last w keys); n={n}, w={w}"
        )
    g = hq // hkv
    dt = compute_dtype(queries, keys)
    q = as_compute(queries, dt).reshape(*lead, hkv, g, w, d)
    k = as_compute(keys, dt)
    s = (1.0 / math.sqrt(d)) if scale is None else float(scale)
    if not lead:
        logits = torch.einsum("hgwd,hnd->hgwn", q, k).mul_(s)
    else:
        logits = torch.einsum("...hgwd,...hnd->...hgwn", q, k).mul_(s)
    if not padded:
        if causal and w > 1:
            # query i is token n-w+i: it must not see keys after itself, all of which lie in
            # the last w columns (masking only those: the window is small, the cache is not)
            later = torch.ones(w, w, dtype=torch.bool, device=keys.device).triu_(1)
            logits[..., n - w :].masked_fill_(later, float("-inf"))
        return torch.softmax(logits, dim=-1)
    dev = keys.device
    nl = _lengths(key_lengths, lead, n, dev)[..., None, None]  # [*B, 1, 1]
    wl = _lengths(query_lengths, lead, w, dev)[..., None]  # [*B, 1]
    j = torch.arange(n, device=dev)
    t = torch.arange(w, device=dev)
    q_real = t >= w - wl  # [*B, w]: real queries are the last w_b slots
    seen = j < nl  # [*B, 1, n]
    if causal:
        # slot t holds real query i = t - (w - w_b), i.e. key index n_b - w_b + i = n_b - w + t
        seen = seen & (j <= nl - w + t[:, None])  # [*B, w, n]
    allowed = (seen & q_real[..., None])[..., None, None, :, :]  # [*B, 1, 1, w, n]
    attn = torch.softmax(logits.masked_fill_(~allowed, float("-inf")), dim=-1)
    # padded query rows saw no key (0/0 = NaN): they carry no attention
    return attn.masked_fill_(~q_real[..., None, None, :, None], 0.0)


def _lengths(lengths: torch.Tensor | None, lead, full: int, device) -> torch.Tensor:
    if lengths is None:
        return torch.full(lead, full, dtype=torch.long, device=device)
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.shape != lead:
        raise ValueError(
            f"lengths must have the leading shape {tuple(lead)}, got {tuple(lengths.shape)}"
        )
    return lengths
