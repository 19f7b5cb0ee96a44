"""What the worker keeps per budgeted request between steps, for the policies that need it.

H2O's running attention sum and Expected Attention's query moments are advanced by every step's
queries in every layer (each query counted once over the request's lifetime) and read when the
request evicts. Both are dropped when the request finishes or restarts (preemption, reset),
except the state of a finished request whose compacted cache is kept for its conversation's
next turn (:mod:`.kept_state`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_caote.engine.rope import FUTURE_POSITIONS, RopeTable
from vllm_caote.scoring import QueryMoments
from vllm_caote.scoring.registry import Policy


@dataclass
class LayerState:
    h2o: torch.Tensor | None = None  # [Hkv, cache_len] running attention sum (H2O policies)
    moments: QueryMoments | None = None  # pre-RoPE query moments (Expected Attention)


@dataclass
class RequestState:
    layers: dict[str, LayerState] = field(default_factory=dict)
    # after its last confirmed step: true tokens seen, and cache slots (what the state covers)
    tokens: int = 0
    cache: int = 0


def advance_h2o(ls: LayerState, policy: Policy, queries, keys, scale) -> None:
    """H2O's sum plus the attention of this step's ``queries [Hq, n, d]`` (the last ``n`` of
    ``keys``)."""
    ls.h2o = policy.advance(queries, keys, ls.h2o, scale=scale)


def advance_moments(
    ls: LayerState, queries: torch.Tensor, first: int, sinks: int, table: RopeTable | None
) -> None:
    """Add this step's ``queries [Hq, n, d]`` (true positions ``first ..``), un-rotated, to the
    moments; the sinks' queries are left out, as kvpress leaves out their hidden states."""
    lo = max(0, sinks - first)
    n = queries.shape[1]
    if lo >= n:
        return
    q = queries[:, lo:]
    if table is not None:
        q = table.unrotate(q, first + lo)
    if ls.moments is None:
        ls.moments = QueryMoments()
    ls.moments.update(q)


def moment_knobs(ls: LayerState, table: RopeTable | None, total: int, device) -> dict:
    """Expected Attention's scoring knobs for a request with ``total`` true tokens: the moments,
    and the average rotation of the next positions (None without a rotary table)."""
    if ls.moments is None or ls.moments.count == 0:
        raise RuntimeError("Expected Attention has no query moments for this request yet")
    rotation = None
    if table is not None:
        rotation = table.future_rotation(total, FUTURE_POSITIONS, device)
    return {"query_moments": ls.moments.mean_cov(), "future_rotation": rotation}
