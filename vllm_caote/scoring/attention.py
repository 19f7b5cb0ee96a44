"""Attention weights of a window of queries over the cached keys (GQA-aware)."""

from __future__ import annotations

import math

import torch

from . import chunking
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
    lead, hq, w, d, hkv, n = _check(queries, keys, causal, key_lengths, query_lengths)
    padded = key_lengths is not None or query_lengths is not None
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


def attention_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: float | None = None,
    causal: bool = True,
    *,
    key_lengths: torch.Tensor | None = None,
    query_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attention_weights(...).sum(dim=-2)``: each key's attention summed over the queries,
    ``[*B, Hkv, G, n]``, in bounded scratch.

    Same arguments and conventions as :func:`attention_weights`. Where the whole computation
    fits one chunk (:mod:`~vllm_caote.scoring.chunking`) it is exactly that sum; otherwise
    queries and keys are walked in chunks, each query's softmax in two passes (its log-sum-exp
    over every key chunk, then ``exp(logit - lse)``), so the ``[.., w, n]`` weights are never
    whole. Equal to the one-chunk sum up to float rounding.
    """
    lead, hq, w, d, hkv, n = _check(queries, keys, causal, key_lengths, query_lengths)
    rows = math.prod(lead)
    q_spans = chunking.query_chunks(w)
    n_spans = chunking.token_chunks(n, rows)
    if len(q_spans) == 1 and len(n_spans) == 1:
        attn = attention_weights(
            queries, keys, scale, causal, key_lengths=key_lengths, query_lengths=query_lengths
        )
        return attn.sum(dim=-2)
    g = hq // hkv
    dt = compute_dtype(queries, keys)
    s = (1.0 / math.sqrt(d)) if scale is None else float(scale)
    dev = keys.device
    nl = _lengths(key_lengths, lead, n, dev)[..., None, None]  # [*B, 1, 1]
    wl = _lengths(query_lengths, lead, w, dev)[..., None]  # [*B, 1]
    out = torch.zeros(*lead, hkv, g, n, dtype=dt, device=dev)
    for qs in q_spans:
        q = as_compute(queries[..., qs, :], dt).reshape(*lead, hkv, g, qs.stop - qs.start, d)
        t = torch.arange(qs.start, qs.stop, device=dev)
        q_real = t >= w - wl  # [*B, wc]: real queries are the last w_b slots

        def logits(span, q=q, t=t, q_real=q_real):
            k = as_compute(keys[..., span, :], dt)
            x = torch.einsum("...hgwd,...hnd->...hgwn", q, k).mul_(s)
            j = torch.arange(span.start, span.stop, device=dev)
            seen = j < nl  # [*B, 1, nc]
            if causal:  # slot t sees keys up to n_b - w + t (see attention_weights)
                seen = seen & (j <= nl - w + t[:, None])
            allowed = (seen & q_real[..., None])[..., None, None, :, :]
            return x.masked_fill_(~allowed, float("-inf"))

        # pass 1: each query's log-sum-exp over the key chunks, in place per chunk
        lse = torch.full((*lead, hkv, g, qs.stop - qs.start), float("-inf"), dtype=dt, device=dev)
        for span in n_spans:
            x = logits(span)
            top = x.amax(dim=-1)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all masked
            part = x.sub_(top[..., None]).exp_().sum(dim=-1).log_().add_(top)
            lse = torch.logaddexp(lse, part)
        # padded query rows saw no key: lse -inf -> +inf gives them weight 0, not NaN
        lse = lse.masked_fill_(torch.isneginf(lse), float("inf"))[..., None]
        # pass 2: normalised weights, summed over the chunk's queries
        for span in n_spans:
            out[..., span] += logits(span).sub_(lse).exp_().sum(dim=-2)
    return out


def _check(queries, keys, causal, key_lengths, query_lengths):
    """Shapes and dtypes of :func:`attention_weights`' inputs: ``(lead, Hq, w, d, Hkv, n)``."""
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
    return lead, hq, w, d, hkv, n


def _lengths(lengths: torch.Tensor | None, lead, full: int, device) -> torch.Tensor:
    if lengths is None:
        return torch.full(lead, full, dtype=torch.long, device=device)
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.shape != lead:
        raise ValueError(
            f"lengths must have the leading shape {tuple(lead)}, got {tuple(lengths.shape)}"
        )
    return lengths
