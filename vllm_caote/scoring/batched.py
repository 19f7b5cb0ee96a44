"""One scoring computation for every request ("row") that evicts in a layer (issue #29).

:func:`score_rows` pads the rows' caches to ``[B, Hkv, N, d]`` (and their window queries to
``[B, Hq, W, d]``, padded on the left) and scores them with one
:meth:`~vllm_caote.scoring.Policy.score_padded` call: the same base functions as the
single-row path, given the padding masks, so the kernel launches of a layer's scoring do not
grow with the number of rows (only the per-row padding copies do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .registry import Policy

#: rows whose cache lengths are within this factor share one padded batch (bounded padding)
DEFAULT_BUCKET_RATIO = 2.0


def batchable(policy: Policy) -> bool:
    """Whether :func:`score_rows` scores ``policy``'s rows in one batched computation."""
    return not (policy.stateful or policy.tracks_queries)


def buckets(
    lengths: Sequence[int],
    ratio: float | None = DEFAULT_BUCKET_RATIO,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Row indices grouped so that padding stays bounded, longest rows first.

    A group holds rows whose lengths are within ``ratio`` of its longest row (None: no
    limit), and at most ``max_tokens`` padded tokens (rows x longest length; None: no
    limit; a single longer row still gets its own group). Deterministic.
    """
    if ratio is not None and ratio < 1:
        raise ValueError(f"bucket ratio must be >= 1 or None, got {ratio}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups:
            g = groups[-1]
            top = lengths[g[0]]
            fits_ratio = ratio is None or top <= ratio * max(lengths[i], 1)
            fits_size = max_tokens is None or (len(g) + 1) * top <= max_tokens
            if fits_ratio and fits_size:
                g.append(i)
                continue
        groups.append([i])
    return groups


def pad_rows(
    rows: Sequence[torch.Tensor], length: int, left: bool = False, fill: float = 0.0
) -> torch.Tensor:
    """``[H, n_i, d]`` rows stacked to ``[B, H, length, d]``, padded on the right (``left``:
    on the left) with ``fill``. A lone row of ``length`` tokens comes back as a view."""
    first = rows[0]
    if len(rows) == 1 and first.shape[-2] == length:
        return first.unsqueeze(0)  # a lone row needs no padded copy (scorers never write it)
    if all(r.shape[-2] == length for r in rows):
        return torch.stack(list(rows))  # nothing to pad: one copy
    out = first.new_full((len(rows), first.shape[0], length, first.shape[-1]), fill)
    for b, r in enumerate(rows):
        n = r.shape[-2]
        if left:
            out[b, :, length - n :] = r
        else:
            out[b, :, :n] = r
    return out


def score_rows(
    policy: Policy,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor] | None,
    queries: Sequence[torch.Tensor | None] | None = None,
    sinks: int = 4,
    scale: float | None = None,
    *,
    row_knobs: Sequence[dict[str, Any]] | None = None,
    h2o_prev: Sequence[torch.Tensor | None] | None = None,
    states: Sequence[torch.Tensor] | None = None,
    bucket_ratio: float | None = DEFAULT_BUCKET_RATIO,
    max_tokens: int | None = None,
    **knobs: Any,
) -> list[torch.Tensor]:
    """Keep-scores of several rows of one layer: ``policy.score`` of each, batched.

    Args:
        policy: the scorer (shared by every row).
        keys, values: per row ``[Hkv, n_i, d]`` (same ``Hkv``, ``d``, dtype and device);
            ``values`` may be None when the policy reads no values.
        queries: per row ``[Hq, w_i, d]`` window queries (the last ``w_i`` tokens of the
            row), or None (the row, or every row, has none: only for policies that do not
            need queries).
        sinks, scale, **knobs: as :meth:`Policy.score`, shared by every row.
        row_knobs: per row extra knobs. Batched rows accept only ``reduce_heads`` here (TOVA's
            cross-rank head sum, one reducer per row); any other per-row knob makes that
            call score row by row.
        h2o_prev: per row running H2O sum, for the per-row fallback of stateful policies
            (``score_with_state``: adds the window queries' attention to it).
        states: per row running H2O sum ``[Hkv, n_i]`` *already advanced* (stateful
            policies only): then the rows are scored batched as
            :meth:`Policy.score_from_state` (the engine's H2O path); queries are unused.
        bucket_ratio, max_tokens: padding bounds, see :func:`buckets`. One padded batch
            (one call of the attention and score kernels) per bucket; ``bucket_ratio=None``
            and ``max_tokens=None``: one batch for every row.

    Returns:
        Per row ``[Hkv, n_i]`` scores, equal (up to float rounding) to
        ``policy.score(keys[i], values[i], queries[i], sinks=sinks, scale=scale, ...)``.

    Stateless policies (SnapKV, TOVA, KeyDiff, StreamingLLM and their CAOTE / FastCAOTE
    forms) are scored batched; so are stateful ones (``h2o*``) given ``states`` (their
    ``score_from_state``). Stateful policies without ``states`` and query-tracking ones
    (``expected-attention*``: per-row query moments) fall back to a per-row loop of
    :meth:`Policy.score_with_state` (same results, no batching).
    """
    b = len(keys)
    if b == 0:
        return []
    row_knobs = list(row_knobs) if row_knobs is not None else [{} for _ in range(b)]
    queries = list(queries) if queries is not None else [None] * b
    values = list(values) if values is not None else [None] * b
    if not (len(row_knobs) == len(queries) == len(values) == b):
        raise ValueError("keys, values, queries and row_knobs must have one entry per row")
    # a shared reducer cannot serve several rows (each sums one row's heads once)
    per_row = knobs.get("reduce_heads") is not None or any(
        set(rk) - {"reduce_heads"} for rk in row_knobs
    )
    if policy.stateful and states is not None and not per_row:
        return _from_states(policy, values, list(states), bucket_ratio, max_tokens, knobs)
    if per_row or not batchable(policy):
        prev = list(h2o_prev) if h2o_prev is not None else [None] * b
        return [
            policy.score_with_state(
                keys[i], values[i], queries[i], None, prev[i], sinks, scale=scale,
                **{**knobs, **row_knobs[i]},
            )[0]
            for i in range(b)
        ]  # fmt: skip
    if policy.needs_values and any(v is None for v in values):
        raise ValueError(f"policy {policy.name!r} needs `values` for every row")
    if policy.needs_attention:
        for i, q in enumerate(queries):
            if q is None:
                raise ValueError(f"policy {policy.name!r} needs `queries` (row {i} has none)")
    lengths = [int(k.shape[-2]) for k in keys]
    out: list[torch.Tensor | None] = [None] * b
    for group in buckets(lengths, bucket_ratio, max_tokens):
        n_max = lengths[group[0]]
        extra = {}
        if any("reduce_heads" in row_knobs[i] for i in group):
            extra["reduce_heads"] = [row_knobs[i].get("reduce_heads") for i in group]
        scores = score_padded_rows(
            policy,
            pad_rows([keys[i] for i in group], n_max),
            pad_rows([values[i] for i in group], n_max) if policy.needs_values else None,
            [queries[i] for i in group],
            [lengths[i] for i in group],
            sinks=sinks,
            scale=scale,
            **{**knobs, **extra},
        )
        for j, i in enumerate(group):
            out[i] = scores[j, :, : lengths[i]]
    return out  # type: ignore[return-value]


def score_padded_rows(
    policy: Policy,
    keys: torch.Tensor,
    values: torch.Tensor | None,
    queries: Sequence[torch.Tensor | None],
    lengths: Sequence[int],
    key_lengths: torch.Tensor | None = None,
    sinks: int = 4,
    scale: float | None = None,
    **knobs: Any,
) -> torch.Tensor:
    """Keep-scores ``[B, Hkv, N]`` of rows already padded (a stateless policy, one call).

    ``keys``/``values`` are ``[B, Hkv, N, d]``: row ``b``'s ``lengths[b]`` tokens first, then
    any finite values (what :meth:`Policy.score_padded` takes); ``queries`` per row
    ``[Hq, w_b, d]`` (None where the policy needs none), padded here on the left;
    ``key_lengths`` is ``lengths`` on the keys' device (made here when None). Row ``b``'s
    scores are ``out[b, :, :lengths[b]]``, those of :func:`score_rows`.
    """
    if policy.needs_values and values is None:
        raise ValueError(f"policy {policy.name!r} needs `values` for every row")
    dev = keys.device
    q_pad = q_len = None
    if policy.needs_attention:
        for i, q in enumerate(queries):
            if q is None:
                raise ValueError(f"policy {policy.name!r} needs `queries` (row {i} has none)")
            if knobs.get("causal", True) and q.shape[-2] > lengths[i]:
                raise ValueError(
                    f"row {i}: causal attention needs n >= w; n={lengths[i]}, w={q.shape[-2]}"
                )
            if q.shape[-2] == 0:
                raise ValueError(f"row {i}: policy {policy.name!r} needs w >= 1 queries")
        qs = [q[:, -1:] for q in queries] if policy.last_query_only else list(queries)
        w_lens = [q.shape[-2] for q in qs]
        q_pad = pad_rows(qs, max(w_lens), left=True)
        if min(w_lens) != max(w_lens):  # else None: every row has all W
            q_len = torch.tensor(w_lens, device=dev)
    if key_lengths is None:
        key_lengths = torch.tensor(list(lengths), device=dev)
    return policy.score_padded(keys, values, q_pad, key_lengths, q_len, sinks, scale=scale, **knobs)


def _from_states(policy, values, states, bucket_ratio, max_tokens, knobs) -> list[torch.Tensor]:
    """Batched :meth:`Policy.score_from_state` of every row (stateful policies)."""
    if len(states) != len(values):
        raise ValueError("states must have one entry per row")
    if policy.needs_values and any(v is None for v in values):
        raise ValueError(f"policy {policy.name!r} needs `values` for every row")
    lengths = [int(s.shape[-1]) for s in states]
    out: list[torch.Tensor | None] = [None] * len(states)
    dev = states[0].device
    for group in buckets(lengths, bucket_ratio, max_tokens):
        n_max = lengths[group[0]]
        st = pad_rows([states[i].unsqueeze(-1) for i in group], n_max).squeeze(-1)
        v_pad = pad_rows([values[i] for i in group], n_max) if policy.needs_values else None
        lens = torch.tensor([lengths[i] for i in group], device=dev)
        scores = policy.score_from_state_padded(v_pad, st, lens, **knobs)
        for j, i in enumerate(group):
            out[i] = scores[j, :, : lengths[i]]
    return out  # type: ignore[return-value]
