"""Base eviction scores: StreamingLLM, H2O, TOVA, SnapKV, KeyDiff.

Every scorer returns ``[Hkv, n]`` scores, one per KV head and cached token; a
higher score means *keep*. Attention-based scorers take ``attn`` of shape
``[Hkv, G, w, n]`` as produced by :func:`~vllm_caote.scoring.attention_weights`
(``G`` query heads per KV head, ``w`` window queries, ``n`` cached tokens).
Outputs are float32, or float64 when the input is float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ._util import as_compute, check_float, check_rank, compute_dtype
from .chunking import token_chunks

_ATTN_SHAPE = "[Hkv, G, w, n]"


def _attn(attn: torch.Tensor) -> torch.Tensor:
    if attn.dim() < 4:
        check_rank("attn", attn, 4, _ATTN_SHAPE)
    check_float("attn", attn)
    return as_compute(attn, compute_dtype(attn))


def _token_mask(valid: torch.Tensor | None, t: torch.Tensor, extra: int) -> torch.Tensor | None:
    """``valid [*B, n]`` with ``extra`` singleton dims before ``n`` (to broadcast with ``t``)."""
    if valid is None:
        return None
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool mask [*B, n], got {valid.dtype}")
    if valid.shape[-1] != t.shape[-1]:
        raise ValueError(f"valid {tuple(valid.shape)} does not cover n={t.shape[-1]} tokens")
    return valid.reshape(*valid.shape[:-1], *([1] * extra), valid.shape[-1])


def streaming_scores(keys: torch.Tensor, sinks: int = 4) -> torch.Tensor:
    """StreamingLLM: position-only scores.

    Args:
        keys: ``[Hkv, n, d]`` (only its shape, device and dtype are used).
        sinks: number of leading "attention sink" tokens to pin.

    Returns:
        ``[Hkv, n]``: ``+inf`` for the first ``sinks`` tokens, the token index
        ``j`` (as float) for the others, so newer tokens always outrank older ones
        and keeping the top-``k`` keeps the sinks plus the most recent tokens.
    """
    if keys.dim() < 3:  # leading batch dims: [*B, Hkv, n, d] -> [*B, Hkv, n]
        check_rank("keys", keys, 3, "[Hkv, n, d]")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    n = keys.shape[-2]
    dt = compute_dtype(keys)
    idx = torch.arange(n, device=keys.device, dtype=dt)
    idx[: min(sinks, n)] = float("inf")
    return idx.expand(*keys.shape[:-1]).clone()


def h2o_scores(attn: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
    """H2O (heavy hitters): accumulated attention.

    ``score[h, j] = prev[h, j] + sum_{g, t} attn[h, g, t, j]``: the sum over the
    ``w`` queries and over the ``G`` query heads of the group, added to the
    running sum ``prev`` of every earlier query.

    Args:
        attn: ``[Hkv, G, w, n]`` attention weights. Each query must be counted once
            over a request's lifetime, so pass only queries not yet accumulated.
        prev: running sum ``[Hkv, m]`` with ``m <= n``, or None. When ``m < n`` the
            last ``n - m`` tokens are new since ``prev`` was computed and start at 0.

    Returns:
        ``[Hkv, n]``, non-negative. This *is* the updated running sum to store.
    """
    check_rank("attn", attn, 4, _ATTN_SHAPE)
    check_float("attn", attn)
    dt = compute_dtype(attn, prev)  # keep a float64 running sum in float64
    s = as_compute(attn, dt).sum(dim=(1, 2))
    if prev is None:
        return s
    check_rank("prev", prev, 2, "[Hkv, m]")
    hkv, n = s.shape
    if prev.shape[0] != hkv or prev.shape[1] > n:
        raise ValueError(f"prev must be [Hkv={hkv}, m<= n={n}], got {tuple(prev.shape)}")
    p = prev.to(device=s.device, dtype=s.dtype)
    if p.shape[1] < n:
        p = F.pad(p, (0, n - p.shape[1]))  # tokens appended since: nothing accumulated yet
    return s + p


def tova_scores(
    attn: torch.Tensor,
    head_average: bool = True,
    reduce_heads: Callable[[torch.Tensor], torch.Tensor]
    | Sequence[Callable[[torch.Tensor], torch.Tensor] | None]
    | None = None,
    *,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """TOVA: attention of the last query.

    With ``head_average=True`` (default, as NVIDIA kvpress's ``TOVAPress`` and the TOVA
    paper's multi-head variant) the last query's attention is averaged over *all* query heads
    of the layer and shared by every KV head: ``score[h, j] = mean_{h', g} attn[h', g, -1, j]``.
    One query's attention is a noisy signal per head; averaged over the layer's heads it keeps
    the tokens the layer as a whole reads. ``head_average=False`` averages over the ``G`` heads
    of each GQA group only (per-KV-head scores). Each row is a distribution (sums to 1).

    ``reduce_heads`` makes the layer-wide average whole when the heads are split over
    tensor-parallel ranks: it is given ``[sum over this rank's heads (n values), head count]``
    and must return that vector summed over the ranks (identity on one rank), so every rank
    scores with the mean over *all* the layer's heads, the same as on one rank.

    Batched: ``attn [B, Hkv, G, w, n]`` (queries padded on the left, so ``[..., -1, :]`` is
    each row's newest query; any leading dims without ``reduce_heads``) gives ``[B, Hkv, n]``;
    ``valid [B, n]`` marks the real tokens, and ``reduce_heads`` is then one callable (or
    None) per row, each given that row's ``n_b + 1`` values exactly as on its own.
    """
    a = _attn(attn)
    if a.shape[-2] == 0:
        raise ValueError("tova_scores needs at least one query (w >= 1)")
    hkv = a.shape[-4]
    last = a[..., -1, :]  # [*B, Hkv, G, n]
    if head_average:
        if reduce_heads is None:
            return last.mean(dim=(-3, -2)).unsqueeze(-2).expand(*last.shape[:-3], hkv, -1).clone()
        heads = last.shape[-3] * last.shape[-2]
        if last.dim() == 3:
            total = reduce_heads(torch.cat([last.sum(dim=(0, 1)), last.new_tensor([heads])]))
            return (total[:-1] / total[-1]).expand(hkv, -1).clone()
        return _tova_reduced_rows(last, heads, reduce_heads, valid)
    return last.mean(dim=-2)


def _tova_reduced_rows(last, heads, reduce_heads, valid) -> torch.Tensor:
    """Head-averaged TOVA of a padded batch, each row's sum completed by its own reducer."""
    if last.dim() != 4 or valid is None or len(reduce_heads) != last.shape[0]:
        raise ValueError(
            "batched reduce_heads needs attn [B, Hkv, G, w, n], valid [B, n] and one reducer "
            "(or None) per row"
        )
    local = last.sum(dim=(1, 2))  # [B, n]
    lengths = valid.sum(dim=-1).tolist()  # host sync: the reducers are collectives anyway
    rows = []
    for b, (reduce, n_b) in enumerate(zip(reduce_heads, lengths, strict=True)):
        vec = torch.cat([local[b, :n_b], local.new_tensor([heads])])
        total = vec if reduce is None else reduce(vec)
        rows.append(F.pad(total[:-1] / total[-1], (0, local.shape[-1] - n_b)))
    return torch.stack(rows).unsqueeze(1).expand(-1, last.shape[1], -1).clone()


def snapkv_scores(
    attn: torch.Tensor,
    kernel_size: int = 7,
    pooling: str = "avg",
    *,
    valid: torch.Tensor | None = None,
    query_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """SnapKV: window-voted attention smoothed along the token axis.

    Convention (matches NVIDIA kvpress ``SnapKVPress.score``, v0.5.5):

    1. ``s[h, g, j] = mean_t attn[h, g, t, j]`` over the ``w`` window queries
       (``= sum / w``: same ranking as the sum in the SnapKV paper);
    2. 1-D pooling over ``j`` with odd ``kernel_size``, stride 1, padding
       ``kernel_size // 2`` (same length). ``pooling="avg"`` is
       ``F.avg_pool1d`` with zero padding counted in the divisor (kvpress and the
       reference SnapKV code's default); ``pooling="max"`` is ``F.max_pool1d``
       (padding never wins) - the max-pool variant of the original code;
    3. mean over the ``G`` query heads of the group (SnapKV issue #22).

    Differences from kvpress: kvpress scores only the ``n - w`` tokens before the
    window and pads the window with ``max + 1``; here all ``n`` columns are pooled
    (the window is protected by the selector instead). So
    ``snapkv_scores(attn[..., :n - w])`` equals kvpress's scores for those tokens.
    kvpress's default kernel is 5; ours is 7 (design doc).

    Batched: ``attn [*B, Hkv, G, w, n]`` gives ``[*B, Hkv, n]``. For a padded batch (see
    :func:`~vllm_caote.scoring.attention_weights`) ``valid [*B, n]`` marks the real tokens
    (pooling then never reads padding; padded tokens score 0) and ``query_lengths [*B]`` the
    real queries (the mean is over those only; padded query rows must be all 0).

    Returns:
        ``[Hkv, n]``, non-negative.
    """
    a = _attn(attn)
    if a.shape[-2] == 0:
        raise ValueError("snapkv_scores needs at least one window query (w >= 1)")
    if query_lengths is None:
        s = a.mean(dim=-2)  # [*B, Hkv, G, n]
    else:
        s = a.sum(dim=-2) / query_lengths.to(a.dtype).reshape(*query_lengths.shape, 1, 1, 1)
    return pool_tokens(s, kernel_size, pooling, valid=_token_mask(valid, s, 2)).mean(dim=-2)


def pool_tokens(
    scores: torch.Tensor,
    kernel_size: int = 7,
    pooling: str = "avg",
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """SnapKV's smoothing along the token (last) axis, any leading shape, same length.

    A token's score becomes the average (or max) over the ``kernel_size`` tokens centred on it
    (zero padding counted, as ``F.avg_pool1d``), so a kept token keeps its neighbours: a
    number or a name spans several tokens, and attention often lands on only one of them.

    ``valid`` (bool, broadcastable to ``scores``) marks the real tokens of right-padded rows:
    padding reads as the zero (avg) or ``-inf`` (max) padding of a row on its own, so every
    real token pools as in its unpadded row; padded tokens come out 0.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if pooling not in ("avg", "max"):
        raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
    if valid is not None:
        fill = 0.0 if pooling == "avg" else float("-inf")
        pooled = pool_tokens(scores.masked_fill(~valid, fill), kernel_size, pooling)
        return pooled.masked_fill(~valid, 0.0)
    n = scores.shape[-1]
    if n == 0 or kernel_size == 1:
        return scores
    x = scores.reshape(-1, 1, n)
    pad = kernel_size // 2
    if pooling == "avg":
        x = F.avg_pool1d(x, kernel_size=kernel_size, stride=1, padding=pad)
    else:
        x = F.max_pool1d(x, kernel_size=kernel_size, stride=1, padding=pad)
    return x.reshape(scores.shape)


def keydiff_scores(
    keys: torch.Tensor, normalize_anchor: bool = True, *, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """KeyDiff: keep keys that differ from the average key.

    ``score[h, j] = -cos(k_j, anchor_h)`` with ``anchor_h`` the mean of the
    *unit-normalised* cached keys of KV head ``h``, as in the KeyDiff paper and NVIDIA
    kvpress ``KeyDiffPress`` (the default). ``normalize_anchor=False`` anchors on the plain
    mean key instead, which lets long keys dominate the anchor. Needs no queries and no
    attention.

    Batched: ``keys [*B, Hkv, n, d]`` gives ``[*B, Hkv, n]``; ``valid [*B, n]`` marks the
    real tokens of right-padded rows (the anchor is their mean; padded tokens score 0).

    Returns:
        ``[Hkv, n]`` in ``[-1, 1]``. A zero anchor gives all-zero scores.

    The keys are read in bounded chunks (:mod:`~vllm_caote.scoring.chunking`): no float copy
    of every key at once.
    """
    if keys.dim() < 3:
        check_rank("keys", keys, 3, "[Hkv, n, d]")
    check_float("keys", keys)
    dt = compute_dtype(keys)
    n = keys.shape[-2]
    m = None if valid is None else _token_mask(valid, keys[..., 0], 1)  # [*B, 1, n]
    spans = token_chunks(n, math.prod(keys.shape[:-3]))
    total = None  # [*B, Hkv, 1, d]: sum of the (unit) real keys
    for span in spans:
        k = as_compute(keys[..., span, :], dt)
        base = F.normalize(k, p=2, dim=-1) if normalize_anchor else k
        if m is not None:
            base = base.masked_fill(~m[..., span, None], 0.0)
        part = base.sum(dim=-2, keepdim=True)
        total = part if total is None else total + part
    if m is None:
        anchor = total / max(n, 1)
    else:
        anchor = total / m.sum(dim=-1, keepdim=True).clamp_min(1).unsqueeze(-1)
    out = torch.empty(keys.shape[:-1], dtype=dt, device=keys.device)  # [*B, Hkv, n]
    for span in spans:
        k = as_compute(keys[..., span, :], dt)
        out[..., span] = -F.cosine_similarity(k, anchor, dim=-1)
    return out if m is None else out.masked_fill_(~m, 0.0)
