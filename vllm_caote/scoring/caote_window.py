"""CAOTE in the paper's form: the eviction error of each window query's own attention row.

The meta-score :func:`~vllm_caote.scoring.caote_scores` takes a base's scores, normalised, as
one ``alpha`` per KV head: for SnapKV and TOVA that ``alpha`` is the window's attention already
averaged over the queries (and the query heads), and pooled over tokens. The derivation (CAOTE,
arXiv:2504.14051, Thm. 3.2) is per query: query ``t`` of query head ``g`` has its own softmax
row ``A[g, t, :]`` and output ``o_gt = A[g, t, :] V``, and evicting token ``j`` changes that output
by exactly ``A[g, t, j] / (1 - A[g, t, j]) * ||v_j - o_gt||``. :func:`caote_window_scores`
computes these errors from the queries and the cache and sums them over the window queries,
keeping one row per query head, so a base's own pipeline (window mean, token pooling, head
average) can run on them in place of the attention weights.

Bounded scratch as :func:`~vllm_caote.scoring.attention_sums`: the queries are walked in
chunks of :data:`~vllm_caote.scoring.chunking.SCORE_CHUNK_QUERIES`, the cached tokens in
chunks of :data:`~vllm_caote.scoring.chunking.SCORE_CHUNK_TOKENS` (rows x tokens); each chunk of
queries takes three passes over the tokens (log-sum-exp, output, errors), so the
``[.., w, n]`` weights are never whole.
"""

from __future__ import annotations

import math

import torch

from . import chunking
from ._util import as_compute, check_float, compute_dtype
from .attention import _check, _lengths
from .caote import caote_scores, fast_caote_scores


def caote_window_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float | None = None,
    causal: bool = True,
    eps: float = 1e-6,
    *,
    key_lengths: torch.Tensor | None = None,
    query_lengths: torch.Tensor | None = None,
    fast: bool = False,
) -> torch.Tensor:
    """Per query head, the CAOTE eviction errors of the window queries, summed over them.

    Args:
        queries, keys, scale, causal, key_lengths, query_lengths: as
            :func:`~vllm_caote.scoring.attention_weights` (``[*B, Hq, w, d]``,
            ``[*B, Hkv, n, d]``; padded rows: keys on the right, queries on the left).
        values: ``[*B, Hkv, n, dv]``, the cached values (padding: any finite values).
        eps: lower clamp on ``1 - A[g, t, j]``.
        fast: FastCAOTE's error (the output ``o_gt`` replaced by the mean of the row's real
            values, :func:`~vllm_caote.scoring.fast_caote_scores`).

    Returns:
        ``[*B, Hkv, G, n]``: ``out[h, g, j] = sum_t A[h,g,t,j] / max(1 - A[h,g,t,j], eps) *
        ||v_j - o_hgt||_2`` over the row's real window queries ``t``, where ``A`` is
        ``attention_weights(queries, keys, ...)`` and ``o_hgt = sum_i A[h,g,t,i] v_i``.
        Invariant: each ``t`` term with ``A[h,g,t,j] < 1`` is the norm of the change of that
        query's output when token ``j`` is dropped and its weights renormalised. Padded tokens
        and tokens a query does not see get 0 from it. float32 (float64 if an input is).
    """
    lead, hq, w, d, hkv, n = _check(queries, keys, causal, key_lengths, query_lengths)
    check_float("values", values)
    if values.shape[:-1] != keys.shape[:-1]:
        raise ValueError(
            f"values {tuple(values.shape)} must match keys {tuple(keys.shape)} but the last dim"
        )
    g = hq // hkv
    dt = compute_dtype(queries, keys, values)
    s = (1.0 / math.sqrt(d)) if scale is None else float(scale)
    dev = keys.device
    nl = _lengths(key_lengths, lead, n, dev)
    wl = _lengths(query_lengths, lead, w, dev)[..., None]  # [*B, 1]
    n_spans = chunking.token_chunks(n, math.prod(lead))
    j_all = torch.arange(n, device=dev)
    real = j_all < nl[..., None]  # [*B, n]
    nl = nl[..., None, None]  # [*B, 1, 1]

    def vals(span):
        v = as_compute(values[..., span, :], dt)
        return v.masked_fill(~real[..., None, span, None], 0.0)

    v_bar = None
    if fast:  # the mean of each row's real values [*B, Hkv, 1, dv]
        v_bar = sum(vals(span).sum(dim=-2, keepdim=True) for span in n_spans)
        v_bar = v_bar / nl.clamp_min(1).to(dt)[..., None]
    out = torch.zeros(*lead, hkv, g, n, dtype=dt, device=dev)
    for qs in chunking.query_chunks(w):
        wc = qs.stop - qs.start
        q = as_compute(queries[..., qs, :], dt).reshape(*lead, hkv, g, wc, d)
        t = torch.arange(qs.start, qs.stop, device=dev)
        q_real = t >= w - wl  # [*B, wc]: real queries are the last w_b slots

        def logits(span, q=q, t=t, q_real=q_real):
            k = as_compute(keys[..., span, :], dt)
            x = torch.einsum("...hgwd,...hnd->...hgwn", q, k).mul_(s)
            j = j_all[span]
            seen = j < nl  # [*B, 1, nc]
            if causal:  # slot t sees keys up to n_b - w + t (see attention_weights)
                seen = seen & (j <= nl - w + t[:, None])
            allowed = (seen & q_real[..., None])[..., None, None, :, :]
            return x.masked_fill_(~allowed, float("-inf"))

        # pass 1: each query's log-sum-exp over the token chunks
        lse = torch.full((*lead, hkv, g, wc), float("-inf"), dtype=dt, device=dev)
        for span in n_spans:
            x = logits(span)
            top = x.amax(dim=-1)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all masked
            lse = torch.logaddexp(lse, x.sub_(top[..., None]).exp_().sum(dim=-1).log_().add_(top))
        # padded query rows saw no key: lse -inf -> +inf gives them weight 0, not NaN
        lse = lse.masked_fill_(torch.isneginf(lse), float("inf"))[..., None]
        # pass 2: each query's output o [*B, Hkv, G*wc, dv]
        if fast:
            o = v_bar
        else:
            o = None
            for span in n_spans:
                a = logits(span).sub_(lse).exp_().flatten(-3, -2)  # [*B, Hkv, G*wc, nc]
                part = torch.einsum("...hqn,...hnd->...hqd", a, vals(span))
                o = part if o is None else o + part
        # pass 3: the errors, summed over the chunk's queries
        for span in n_spans:
            a = logits(span).sub_(lse).exp_()  # [*B, Hkv, G, wc, nc]
            gain = a.div_(torch.rsub(a, 1.0).clamp_min_(eps))  # in place: 2 such tensors at most
            dist = torch.cdist(o, vals(span), p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
            if not fast:
                dist = dist.unflatten(-2, (g, wc))
            else:
                dist = dist.unsqueeze(-2)  # [*B, Hkv, 1, 1, nc]: the same for every query
            out[..., span] += gain.mul_(dist).sum(dim=-2)
    return out


def _errors_from_attn(attn: torch.Tensor, values: torch.Tensor, eps: float, fast: bool):
    """``[Hkv, G, n]`` errors of precomputed rows ``attn [Hkv, G, w, n]`` (one row)."""
    if attn.dim() != 4:
        raise ValueError(f"attn must be [Hkv, G, w, n], got {tuple(attn.shape)}")
    per_head = fast_caote_scores if fast else caote_scores
    g = attn.shape[1]
    # the G query heads as a leading batch dim: each scored with its KV head's values
    errors = per_head(attn.transpose(0, 1), values.expand(g, *values.shape), eps=eps)
    return errors.transpose(0, 1)


def window_form(policy, keys, values, queries, attn, sinks, k) -> torch.Tensor:
    """``[Hkv, n]`` keep-scores of ``policy`` (a CAOTE form over a base that reads the window's
    attention) in the paper's form, one row: the base's own pipeline (``_base``) run on the
    per-query-head CAOTE errors (:func:`caote_window_scores`) in place of the attention weights,
    averaged over the window queries where the base averages them (``window_mean``)."""
    base, fast = policy.base, policy.meta == "fast-caote"
    if keys.dim() != 3:
        raise ValueError(f"keys must be [Hkv, n, d], got {tuple(keys.shape)}")
    if attn is not None:
        if base.last_query_only:
            attn = attn[..., -1:, :]
        errors, w = _errors_from_attn(attn, values, k["eps"], fast), attn.shape[-2]
    else:
        if queries is None:
            raise ValueError(f"policy {policy.name!r} needs `queries` or `attn`")
        if base.last_query_only:
            queries = queries[..., -1:, :]
        errors = caote_window_scores(
            queries, keys, values, k["scale"], k["causal"], k["eps"], fast=fast
        )
        w = queries.shape[-2]
    if base.window_mean:
        errors = errors / w
    return base._base(keys, values, errors.unsqueeze(-2), None, sinks, k)[0]


def window_form_padded(
    policy, keys, values, queries, key_lengths, query_lengths, sinks, k
) -> torch.Tensor:
    """:func:`window_form` of a padded batch (``Policy.score_padded``'s arguments):
    ``[B, Hkv, N]``, padded tokens 0."""
    base, fast = policy.base, policy.meta == "fast-caote"
    if keys.dim() != 4:
        raise ValueError(f"keys must be [B, Hkv, N, d], got {tuple(keys.shape)}")
    if queries is None:
        raise ValueError(f"policy {policy.name!r} needs `queries`")
    key_lengths = torch.as_tensor(key_lengths, device=keys.device)
    valid = torch.arange(keys.shape[2], device=keys.device) < key_lengths[:, None]
    if query_lengths is not None:
        query_lengths = torch.as_tensor(query_lengths, device=keys.device)
    if base.last_query_only:
        queries, query_lengths = queries[..., -1:, :], None
    errors = caote_window_scores(
        queries, keys, values, k["scale"], k["causal"], k["eps"],
        key_lengths=key_lengths, query_lengths=query_lengths, fast=fast,
    )  # fmt: skip
    if base.window_mean:
        if query_lengths is None:
            errors = errors / queries.shape[-2]
        else:
            errors = errors / query_lengths.to(errors.dtype).reshape(-1, 1, 1, 1)
    return base._base_padded(keys, values, errors.unsqueeze(-2), sinks, k, valid, query_lengths)
