"""CAOTE: attention-output-error token scores (Goel et al., arXiv:2504.14051).

For one query with attention ``alpha`` over ``n`` cached tokens and output
``o = sum_i alpha_i v_i``, evicting token ``j`` and renormalising the remaining
weights (``alpha'_i = alpha_i / (1 - alpha_j)``) changes the output by exactly

    o - o_{-j} = alpha_j / (1 - alpha_j) * (v_j - o)

so the CAOTE score ``c_j = alpha_j / (1 - alpha_j) * ||v_j - o||_2`` is the norm
of the true eviction error (paper Thm. 3.2). Scores of several queries (window
queries, query heads of a GQA group) are summed. As a meta-score, any
non-negative base score ``s`` can stand in for ``alpha`` after ``alpha = s / sum s``.
"""

from __future__ import annotations

import math

import torch

from ._util import as_compute, check_float, check_rank, compute_dtype
from .chunking import token_chunks


def _prepare(base_scores: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None = None):
    """Validate and return ``(alpha [*B, Hkv, Q, n], compute dtype)``.

    ``alpha`` is ``base_scores`` clamped at 0 and normalised to sum to 1 over the
    last dim; an all-zero row stays all-zero (no token carries weight, all scores 0).
    Leading batch dims ``*B`` are those of ``values`` beyond ``[Hkv, n, d]``; with
    ``valid [*B, n]`` the padded tokens get ``alpha = 0`` (and zero values, in
    :func:`_value_chunks`). The values are not cast here: they are read chunk by chunk.
    """
    check_float("base_scores", base_scores)
    check_float("values", values)
    if values.dim() < 3:
        check_rank("values", values, 3, "[Hkv, n, d]")
    lead = values.shape[:-3]
    nb = len(lead)
    if base_scores.dim() < nb + 2:
        raise ValueError(
            f"base_scores must be [Hkv, n] or [Hkv, ..., n], got {tuple(base_scores.shape)}"
        )
    hkv, n, _ = values.shape[-3:]
    if base_scores.shape[: nb + 1] != values.shape[: nb + 1] or base_scores.shape[-1] != n:
        raise ValueError(
            f"base_scores {tuple(base_scores.shape)} does not match values "
            f"{tuple(values.shape)}: need first dim Hkv={hkv} and last dim n={n}"
        )
    dt = compute_dtype(base_scores, values)
    q = math.prod(base_scores.shape[nb + 1 : -1])  # flattened extra query dims (1 if none)
    s = as_compute(base_scores, dt).reshape(*lead, hkv, q, n).clamp_min(0)
    if valid is not None:
        if valid.shape != (*lead, n):
            raise ValueError(f"valid must be {(*lead, n)}, got {tuple(valid.shape)}")
        s = s.masked_fill(~valid[..., None, None, :], 0.0)
    total = s.sum(dim=-1, keepdim=True)
    # where total == 0 the numerator is 0 too, so the clamp only avoids 0/0
    alpha = s / total.clamp_min(torch.finfo(dt).tiny)
    return alpha, dt


def _value_chunks(values: torch.Tensor, valid: torch.Tensor | None, dt: torch.dtype):
    """``(span, values[..., span, :] in dt, padding zeroed)`` over the tokens in bounded chunks
    (:mod:`~vllm_caote.scoring.chunking`): no float copy of every value at once."""
    for span in token_chunks(values.shape[-2], math.prod(values.shape[:-3])):
        v = as_compute(values[..., span, :], dt)
        if valid is not None:
            v = v.masked_fill(~valid[..., None, span, None], 0.0)
        yield span, v


def _eviction_gain(alpha: torch.Tensor, eps: float) -> torch.Tensor:
    # 1/(1 - alpha) blows up when one token holds all the weight; clamp as the paper's guard
    return alpha / (1.0 - alpha).clamp_min(eps)


def caote_scores(
    base_scores: torch.Tensor,
    values: torch.Tensor,
    eps: float = 1e-6,
    *,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """CAOTE meta-score from arbitrary non-negative base scores.

    Args:
        base_scores: ``[Hkv, n]`` or ``[Hkv, *Q, n]`` (extra query dims, e.g.
            ``[Hkv, G, w, n]`` attention weights). Must be finite and non-negative
            (negatives are clamped to 0). Each row over the last dim is normalised to
            ``alpha`` summing to 1 (an all-zero row gives zero scores).
        values: ``[Hkv, n, d]`` cached values.
        eps: lower clamp on ``1 - alpha_j``.

    Returns:
        ``[Hkv, n]``: ``c_j = sum_q alpha_qj / max(1 - alpha_qj, eps) * ||v_j - o_q||_2``
        with ``o_q = sum_i alpha_qi v_i``. Invariant: for every query row ``q`` with
        ``alpha_qj < 1``, the ``q`` term equals ``||o_q - o_q^{(-j)}||_2``, the change of
        the output when token ``j`` is dropped and the rest renormalised.
        float32, or float64 if an input is float64.

    Batched: ``values [*B, Hkv, n, d]`` with ``base_scores [*B, Hkv, *Q, n]`` gives
    ``[*B, Hkv, n]``; ``valid [*B, n]`` marks the real tokens of right-padded rows: padding
    is left out of ``alpha``'s normalisation and of ``o``, and scores 0.
    """
    alpha, dt = _prepare(base_scores, values, valid)
    o = None  # [*B, Hkv, Q, d], summed over the value chunks
    for span, v in _value_chunks(values, valid, dt):
        part = torch.einsum("...hqn,...hnd->...hqd", alpha[..., span], v)
        o = part if o is None else o + part
    gain = _eviction_gain(alpha, eps)
    out = alpha.new_empty(alpha.shape[:-2] + alpha.shape[-1:])  # [*B, Hkv, n]
    for span, v in _value_chunks(values, valid, dt):
        # direct (not ||a||^2 - 2ab + ||b||^2) distances: no cancellation when v_j ~ o,
        # and no [Hkv, Q, n, d] intermediate
        dist = torch.cdist(o, v, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
        out[..., span] = (gain[..., span] * dist).sum(dim=-2)
    return out


def caote_attention_scores(
    attn: torch.Tensor, values: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Plain CAOTE from attention weights.

    Args:
        attn: ``[Hkv, G, w, n]`` softmax attention (each query row is its own
            ``alpha``; rows already sum to 1).
        values: ``[Hkv, n, d]``.

    Returns:
        ``[Hkv, n]``: the exact per-query eviction errors ``||o - o_{-j}||_2`` summed
        over the ``w`` window queries and the ``G`` query heads of each KV head.
    """
    check_rank("attn", attn, 4, "[Hkv, G, w, n]")
    return caote_scores(attn, values, eps=eps)


def fast_caote_scores(
    base_scores: torch.Tensor,
    values: torch.Tensor,
    eps: float = 1e-6,
    *,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """FastCAOTE: CAOTE with the attention output replaced by the plain mean of values.

    Definition (CAOTE paper, arXiv:2504.14051 v6, "FastCAOTE"): the pre-eviction
    attention output ``X_attn = sum_i alpha_i v_i`` is approximated by the
    unweighted mean of the cached values ``v_bar = (1/n) sum_i v_i``:

        c_j = alpha_j / (1 - alpha_j) * ||v_j - v_bar||_2

    ``v_bar`` and ``||v_j - v_bar||`` do not depend on the query, so the cost is
    O(n * d) per KV head instead of O(Q * n * d), and no weighted sum is needed.
    It is exact when ``alpha`` is uniform (then ``o == v_bar``); the paper reports
    Spearman correlation >= 0.8 with CAOTE in every layer and similar accuracy.

    Args / returns: as :func:`caote_scores` (``alpha`` normalised the same way,
    summed over any extra query dims; leading batch dims and ``valid`` likewise, ``v_bar``
    then the mean of each row's real values).
    """
    alpha, dt = _prepare(base_scores, values, valid)
    v_sum = None  # [*B, Hkv, 1, d]; padded values are 0, so this is the real values' sum
    for _, v in _value_chunks(values, valid, dt):
        part = v.sum(dim=-2, keepdim=True)
        v_sum = part if v_sum is None else v_sum + part
    if valid is None:
        v_bar = v_sum / max(values.shape[-2], 1)
    else:
        v_bar = v_sum / valid.sum(dim=-1).clamp_min(1).to(dt)[..., None, None, None]
    dist = alpha.new_empty(alpha.shape[:-2] + alpha.shape[-1:])  # [*B, Hkv, n]
    for span, v in _value_chunks(values, valid, dt):
        dist[..., span] = torch.linalg.vector_norm(v - v_bar, ord=2, dim=-1)
    return _eviction_gain(alpha, eps).sum(dim=-2) * dist
