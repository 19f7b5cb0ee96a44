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
    if span > 0 and scores.is_floating_point():
        clean = torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)
        flat = clean.reshape(-1, 1, n)
        scores = F.max_pool1d(flat, 2 * span + 1, stride=1, padding=span).reshape(clean.shape)
    mid = scores[..., mid_lo:mid_hi]
    if mid.is_floating_point():
        mid = torch.where(torch.isnan(mid), torch.full_like(mid, float("-inf")), mid)
    # stable descending sort of the *reversed* middle: equal scores keep reversed
    # order, i.e. the newer token comes first
    rev = mid.flip(-1)
    order = torch.sort(rev, dim=-1, descending=True, stable=True).indices[..., :m]
    chosen = (mid_hi - mid_lo - 1 - order) + mid_lo
    parts = [
        torch.arange(0, sinks, device=dev).expand(*lead, sinks),
        chosen,
        torch.arange(mid_hi, n, device=dev).expand(*lead, protect_recent),
    ]
    out = torch.cat(parts, dim=-1)
    return torch.sort(out, dim=-1).values
