"""Per-head top-k selection of the tokens to keep."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def select_keep(
    scores: torch.Tensor, keep: int, protect_recent: int = 0, sinks: int = 0, span: int = 0
) -> torch.Tensor:
    """Indices of the ``keep`` tokens to keep in every head.

    ``span`` keeps spans, not tokens: every token is ranked by the best score within ``span``
    tokens of it (a max filter over the token axis), so the tokens next to a high-scoring one
    are kept with it. A number or a name is several tokens and attention often lands on one
    of them: measured on the retrieval suite (24 prompts, 25% budget, 128-token blocks, the
    whole prompt in view), span 3 took CAOTE-SnapKV from 5 to 14 found keys and SnapKV from 5
    to 14 (full cache 13), while it took CAOTE-TOVA from 10 to 6, so it is a per-policy choice
    (:attr:`vllm_caote.scoring.registry.Policy.span`).

    Args:
        scores: ``[H, n]`` (any leading dims ``[..., n]`` work the same way); higher
            means keep. NaN counts as the lowest possible score.
        keep: number of tokens to keep per head (the same count everywhere, so one
            block table still serves every head).
        protect_recent: the last ``protect_recent`` tokens (observation window) are
            always kept.
        sinks: the first ``sinks`` tokens are always kept.

    Returns:
        ``LongTensor [H, keep]``, each row sorted ascending and without duplicates.
        If ``keep >= n`` every token is kept: ``arange(n)`` per head (shape
        ``[H, n]``). Otherwise the row holds the sinks, the protected recent
        tokens and the ``keep - sinks - protect_recent`` best-scored tokens in
        between; among equal scores the newer token wins (deterministic).

    Raises:
        ValueError: negative arguments, or ``keep < protect_recent + sinks``
            (the protected tokens alone would not fit).
    """
    if scores.dim() < 1:
        raise ValueError("scores must have shape [H, n]")
    if keep < 0 or protect_recent < 0 or sinks < 0:
        raise ValueError(
            f"keep, protect_recent and sinks must be >= 0, got {keep}, {protect_recent}, {sinks}"
        )
    if keep < protect_recent + sinks:
        raise ValueError(
            f"keep={keep} is smaller than the always-kept tokens: "
            f"protect_recent={protect_recent} + sinks={sinks} = {protect_recent + sinks}"
        )
    lead = scores.shape[:-1]
    n = scores.shape[-1]
    dev = scores.device
    if keep >= n:
        return torch.arange(n, device=dev).expand(*lead, n).clone()
    # here sinks + protect_recent <= keep < n: the two protected ranges are disjoint
    mid_lo, mid_hi = sinks, n - protect_recent
    m = keep - sinks - protect_recent  # free slots in the middle
    protected = _protected(tuple(lead), sinks, mid_hi, n, dev)
    if m == 0:
        return protected.clone()
    if scores.is_floating_point():
        # NaN ranks lowest (-inf); infinities stay as they are
        scores = torch.nan_to_num(
            scores, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")
        )
        if span > 0:
            scores = _max_filter(scores, span)
    # stable ascending sort: equal scores keep token order, so the last ``m`` are the best
    # scores with the newer token first among equals
    order = torch.sort(scores[..., mid_lo:mid_hi], dim=-1, stable=True).indices[..., -m:]
    out = torch.cat([protected, order + mid_lo], dim=-1)
    return torch.sort(out, dim=-1).values


def segment_ids(boundary: torch.Tensor, max_len: int = 0) -> torch.Tensor:
    """Segment index ``[n]`` of every token, from ``boundary`` ``[n]`` (bool; True: the token
    ends a segment, e.g. a sentence's full stop).

    A segment runs from the token after a boundary to the next boundary, inclusive (the last
    one to the end). With ``max_len > 0`` a longer segment is cut into pieces of ``max_len``
    tokens counted back from its end, so the piece that ends a sentence (where a stated value
    usually sits) stays whole. Indices start at 0 and go up by one from segment to segment.
    """
    if boundary.dim() != 1:
        raise ValueError("boundary must have shape [n]")
    if max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    n = boundary.numel()
    dev = boundary.device
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=dev)
    b = boundary.to(torch.bool)
    ar = torch.arange(n, device=dev)
    # first boundary at or after each token (n - 1 for the tail after the last one)
    ends = torch.where(b, ar, torch.full_like(ar, n - 1))
    end = torch.flip(torch.cummin(torch.flip(ends, (0,)), 0).values, (0,))
    starts = torch.zeros(n, dtype=torch.bool, device=dev)
    starts[1:] = b[:-1]  # a segment starts after a boundary
    if max_len > 0:
        starts[1:] |= ((end - ar) % max_len == max_len - 1)[1:]
    starts[0] = False
    return torch.cumsum(starts.long(), 0)


def select_keep_segments(
    scores: torch.Tensor,
    keep: int,
    segments: torch.Tensor,
    protect_recent: int = 0,
    sinks: int = 0,
) -> torch.Tensor:
    """:func:`select_keep` that keeps whole segments: every token is ranked by the best score
    in its segment (then by its own), so the segment of the best-scored token is kept whole
    before the next one is started; only the last segment taken may be cut.

    Args:
        scores: ``[..., n]`` keep-scores as for :func:`select_keep` (NaN lowest).
        keep, protect_recent, sinks: as for :func:`select_keep`.
        segments: integer segment ids ``[..., n]``, broadcastable to ``scores`` (tokens of
            one segment share an id; e.g. :func:`segment_ids`, gathered at the cached
            tokens' positions once they are not contiguous).

    Returns:
        As :func:`select_keep`: ``LongTensor [..., keep]``, rows sorted ascending. A segment's
        best score is taken over its evictable tokens only (the sinks and the recent window
        are kept anyway and do not pull their segment in). Among equal keys the newer token
        wins.
    """
    n = scores.shape[-1]
    if keep >= n or keep <= protect_recent + sinks:
        # everything, or only the protected tokens: no ranking needed (errors as select_keep)
        return select_keep(scores, keep, protect_recent, sinks)
    s = scores if scores.is_floating_point() else scores.double()
    s = torch.nan_to_num(s, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    seg = segments.to(device=s.device, dtype=torch.long).expand_as(s)
    mid = s.clone()
    mid[..., :sinks] = float("-inf")
    mid[..., n - protect_recent :] = float("-inf")
    n_seg = int(seg.max()) + 1
    best = mid.new_full((*s.shape[:-1], n_seg), float("-inf"))
    best = best.scatter_reduce(-1, seg, mid, "amax").gather(-1, seg)
    # lexicographic (segment best, own score, position): stable sorts, the minor key first
    by_own = torch.sort(s, dim=-1, stable=True).indices
    order = by_own.gather(-1, torch.sort(best.gather(-1, by_own), dim=-1, stable=True).indices)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(n, device=s.device).expand_as(order)
    )
    return select_keep(rank, keep, protect_recent, sinks)


def recent_window(keep: int, window: int, recent: float, sinks: int = 0) -> int:
    """The newest tokens a selection keeping ``keep`` protects (``select_keep``'s
    ``protect_recent``): the observation ``window``, or ``floor(recent * keep)`` when that is
    more, and never more than the ``keep - sinks`` slots the sinks leave.

    ``recent`` sizes the protected window to the budget: language modelling reads the newest
    tokens most, and a fixed window becomes a small share of a large budget. 0 gives the
    observation window alone (the selection before this knob)."""
    if not 0.0 <= recent <= 1.0:
        raise ValueError(f"recent must be a fraction in [0, 1], got {recent}")
    if keep < 0 or window < 0 or sinks < 0:
        raise ValueError(f"keep, window and sinks must be >= 0, got {keep}, {window}, {sinks}")
    return max(window, min(int(recent * keep), keep - sinks))


def _max_filter(scores: torch.Tensor, span: int) -> torch.Tensor:
    """The best score within ``span`` tokens of each token (no NaN in ``scores``)."""
    k = 2 * span + 1
    if scores.dim() in (2, 3):  # max_pool1d's (C, L) and (N, C, L): pooled per row
        return F.max_pool1d(scores, k, stride=1, padding=span)
    flat = scores.reshape(-1, 1, scores.shape[-1])
    return F.max_pool1d(flat, k, stride=1, padding=span).reshape(scores.shape)


#: (lead shape, sinks, first recent token, n, device) -> the always-kept indices
#: ``[*lead, sinks + n - first]`` (sinks, then the recent window): built once per shape, as an
#: eviction repeats at the same cache length; a few hundred bytes each, bounded in number
_PROTECTED: dict[tuple, torch.Tensor] = {}
_PROTECTED_MAX = 256


def _protected(lead: tuple, sinks: int, recent_from: int, n: int, dev) -> torch.Tensor:
    key = (lead, sinks, recent_from, n, dev)
    t = _PROTECTED.get(key)
    if t is None:
        if len(_PROTECTED) >= _PROTECTED_MAX:
            _PROTECTED.clear()
        # made on the device: no host-to-device copy
        idx = torch.cat([torch.arange(sinks, device=dev), torch.arange(recent_from, n, device=dev)])
        t = idx.expand(*lead, idx.numel()).contiguous()
        _PROTECTED[key] = t
    return t
