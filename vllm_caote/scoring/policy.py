"""Policies composed like kvpress presses: a base score, alone or wrapped by a meta-score.

A base score (:mod:`vllm_caote.scoring.bases`: ``SnapKV()``, ``TOVA()``, ``H2O()``,
``KeyDiff()``, ``ExpectedAttention()``, ``StreamingLLM()``) is a small frozen dataclass whose
fields are its settings. ``CAOTE(base)`` and ``FastCAOTE(base)`` wrap any base whose scores are
non-negative, so a new base gets its CAOTE forms for free.

Invariants:

* a policy's keep-scores are a pure function of its inputs and its fields: knobs passed to a
  call (:data:`KNOBS`) override the fields for that call only, and runtime data (the TP head
  reducer, Expected Attention's query moments) only ever arrives as knobs;
* policies hold no state: a ``stateful`` policy (H2O) hands its updated running sum back to
  the caller, which keeps it per request and layer and compacts it with the cache;
* the capability flags (``needs_attention``, ``needs_queries``, ``stateful``,
  ``tracks_queries``, ``cross_head``, ``last_query_only``, ``window_mean``, ``span``) let the
  engine skip work; a meta-score has its base's flags and also reads the values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cached_property
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from .attention import attention_sums
from .base import h2o_scores, pool_tokens
from .expected import query_moments

#: Tunable knobs accepted by :meth:`Policy.score` and their defaults. A policy ignores the
#: knobs it does not use, so the engine can pass one set to any policy. A policy's own fields
#: of the same names are its defaults; a knob passed to a call wins over them.
KNOBS: Mapping[str, Any] = MappingProxyType(
    {
        "kernel_size": 7,  # SnapKV pooling kernel (odd)
        "pooling": "avg",  # SnapKV pooling: "avg" (kvpress) or "max"
        "scale": None,  # attention logit scale; None = 1/sqrt(d)
        "causal": True,  # queries are the last w cached tokens
        "eps": 1e-6,  # CAOTE clamp on 1 - alpha
        "normalize_anchor": True,  # KeyDiff: anchor = mean of unit keys (paper, kvpress)
        "head_average": True,  # TOVA: last query's attention averaged over all heads (kvpress)
        # TOVA's head average across tensor-parallel ranks: sums [local head sums, head count]
        # over the ranks (None: every head is here)
        "reduce_heads": None,
        # H2O, TOVA and KeyDiff scores pooled over tokens with SnapKV's kernel, so a kept token
        # keeps its neighbours (a 5-digit number is 5 tokens); False = the papers' (kvpress's)
        "pool_neighbours": True,
        # Expected Attention: (mean [Hq, d], cov [Hq, d, d]) of the pre-RoPE queries so far
        # (None: the moments of ``queries``), the average rotation [d, d] of the next positions
        # (None: identity), whether the covariance term is used, and the value-norm scaling
        "query_moments": None,
        "future_rotation": None,
        "use_covariance": True,
        "use_vnorm": True,
        # CAOTE's alpha: "base" = the base's scores as the base outputs them (window-averaged,
        # head-averaged, pooled), normalised; "attention" = the paper's form: each window
        # query's own softmax row per query head (bases that read the window's attention:
        # SnapKV, TOVA), the base's averaging and pooling applied to the CAOTE errors after;
        # for the other bases their un-pooled scores, neighbour pooling applied after
        "caote_alpha": "base",
    }
)


def neighbours(
    scores: torch.Tensor, k: Mapping[str, Any], valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``scores`` pooled over tokens (knob ``pool_neighbours``), as SnapKV pools its own.

    ``valid [B, n]``: the real tokens of a padded batch ``[B, Hkv, n]`` (padding scores 0)."""
    if valid is not None:
        valid = valid.unsqueeze(-2)  # [B, 1, n]
        if not k["pool_neighbours"]:
            return scores.masked_fill(~valid, 0.0)
    if not k["pool_neighbours"]:
        return scores
    return pool_tokens(scores, kernel_size=k["kernel_size"], pooling=k["pooling"], valid=valid)


@dataclass(frozen=True)
class Policy:
    """A named keep-score for one layer's cache (higher = keep). Subclass :class:`BaseScore`
    for a new score; wrap one in :class:`CAOTE` / :class:`FastCAOTE` for its meta forms."""

    #: the API name (``kv_policy``)
    name: ClassVar[str] = ""
    #: None (a base score), ``"caote"`` or ``"fast-caote"``
    meta: ClassVar[str | None] = None
    #: the scores depend on the window queries' attention (``attn`` ``[Hkv, G, w, n]``, or
    #: ``queries`` to compute it)
    needs_attention: ClassVar[bool] = False
    #: the policy cannot run without ``queries`` or ``attn``
    needs_queries: ClassVar[bool] = False
    #: the policy keeps a running per-token sum across calls (H2O)
    stateful: ClassVar[bool] = False
    #: base scores are >= 0, so CAOTE can use them as ``alpha``
    nonnegative: ClassVar[bool] = False
    #: the scores combine every head of the layer (knob ``reduce_heads`` sums across ranks)
    cross_head: ClassVar[bool] = False
    #: tokens kept around each selected one (``select_keep(span=...)``): whole spans
    span: ClassVar[int] = 0
    #: the scores read only the newest window query's attention (TOVA): the others' attention
    #: is not computed (the newest query sees every key, so its row is the same either way)
    last_query_only: ClassVar[bool] = False
    #: the scores read running moments of *every* query of the request (Expected Attention):
    #: the caller feeds each step's queries, un-rotated, and passes knob ``query_moments``
    tracks_queries: ClassVar[bool] = False
    #: the base reads the window queries' attention averaged over them (SnapKV), not summed
    window_mean: ClassVar[bool] = False

    @property
    def needs_values(self) -> bool:
        """CAOTE variants read the cached values."""
        return self.meta is not None

    def settings(self) -> dict[str, Any]:
        """This policy's fields that are :data:`KNOBS` (its defaults for them)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in KNOBS}

    # -- public API -------------------------------------------------------------
    def score(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor | None = None,
        attn: torch.Tensor | None = None,
        h2o_prev: torch.Tensor | None = None,
        sinks: int = 4,
        **knobs: Any,
    ) -> torch.Tensor:
        """Keep-scores ``[Hkv, n]`` for one layer (higher = keep).

        Args:
            keys, values: ``[Hkv, n, d]`` cached keys and values.
            queries: ``[Hq, w, d]`` window queries (used to compute ``attn`` when
                the policy needs attention and ``attn`` is None).
            attn: ``[Hkv, G, w, n]`` precomputed attention weights.
            h2o_prev: running H2O sum ``[Hkv, m]`` (``m <= n``) for stateful policies.
            sinks: leading tokens pinned by StreamingLLM (others ignore it; the
                selector protects sinks for every policy).
            **knobs: see :data:`KNOBS`; unknown names raise TypeError.
        """
        return self.score_with_state(keys, values, queries, attn, h2o_prev, sinks, **knobs)[0]

    def score_with_state(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor | None = None,
        attn: torch.Tensor | None = None,
        h2o_prev: torch.Tensor | None = None,
        sinks: int = 4,
        **knobs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Like :meth:`score`, also returning the new running state.

        Returns ``(scores [Hkv, n], state)``; ``state`` is the updated H2O sum
        ``[Hkv, n]`` for stateful policies and None otherwise.
        """
        k = self._knobs(knobs)
        if keys.dim() != 3:
            raise ValueError(f"keys must be [Hkv, n, d], got {tuple(keys.shape)}")
        if self.needs_attention:
            attn = self._attention(keys, queries, attn, k)
        if self.tracks_queries and k["query_moments"] is None:
            if queries is None:
                raise ValueError(f"policy {self.name!r} needs `queries` or `query_moments`")
            k["query_moments"] = query_moments(queries)
        base, state = self._base(keys, values, attn, h2o_prev, sinks, k)
        return self._meta_scores(base, values, k), state

    def score_padded(
        self,
        keys: torch.Tensor,
        values: torch.Tensor | None,
        queries: torch.Tensor | None,
        key_lengths: torch.Tensor,
        query_lengths: torch.Tensor | None = None,
        sinks: int = 4,
        **knobs: Any,
    ) -> torch.Tensor:
        """:meth:`score` of a padded batch of rows in one computation (stateless policies).

        Args:
            keys, values: ``[B, Hkv, N, d]``, row ``b``'s ``key_lengths[b]`` tokens first,
                then padding (any finite values; ``values`` may be None unless
                :attr:`needs_values`).
            queries: ``[B, Hq, W, d]``, row ``b``'s ``query_lengths[b]`` window queries
                *last* (padding first), or None for policies that need no queries.
            key_lengths, query_lengths: LongTensor ``[B]`` on the inputs' device
                (``query_lengths`` None: all ``W``). With ``causal`` each row needs
                ``n_b >= w_b`` (not checked here; :func:`~vllm_caote.scoring.score_rows`
                checks).
            sinks, **knobs: as :meth:`score`, shared by every row, except that
                ``reduce_heads`` is one reducer (or None) per row.

        Returns:
            ``[B, Hkv, N]``: ``out[b, :, :n_b]`` equals :meth:`score` of row ``b`` alone (up to
            float rounding); padded tokens score 0 (``streaming``: their index).
        """
        if self.stateful or self.tracks_queries:
            raise ValueError(f"policy {self.name!r} keeps per-request state: score rows singly")
        k = self._knobs(knobs)
        if keys.dim() != 4:
            raise ValueError(f"keys must be [B, Hkv, N, d], got {tuple(keys.shape)}")
        b, _, n, _ = keys.shape
        key_lengths = torch.as_tensor(key_lengths, device=keys.device)
        valid = torch.arange(n, device=keys.device) < key_lengths[:, None]  # [B, N]
        attn = None
        if self.needs_attention:
            if queries is None:
                raise ValueError(f"policy {self.name!r} needs `queries`")
            if self.last_query_only:
                queries, query_lengths = queries[..., -1:, :], None
            if query_lengths is None:
                query_lengths = torch.full((b,), queries.shape[-2], device=keys.device)
            query_lengths = torch.as_tensor(query_lengths, device=keys.device)
            attn = self._window_attention(queries, keys, k, key_lengths, query_lengths)
        base = self._base_padded(keys, values, attn, sinks, k, valid, query_lengths)
        return self._meta_scores(base, values, k, valid)

    def accumulate(self, attn: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """Updated running sum ``prev + sum_{g,t} attn`` (stateful policies only)."""
        if not self.stateful:
            raise ValueError(f"policy {self.name!r} is not stateful")
        return h2o_scores(attn, prev)

    def advance(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        prev: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """One step of a stateful policy: ``prev`` plus the attention of this step's queries.

        ``queries`` ``[Hq, n, d]`` are the step's new tokens, i.e. the last ``n`` of ``keys``
        ``[Hkv, m, d]`` (causal). Called once per step, every query is counted exactly once
        over the request's lifetime, whatever the step sizes and eviction times.
        """
        sums = attention_sums(queries, keys, scale=scale, causal=True)  # bounded scratch
        return self.accumulate(sums.unsqueeze(-2), prev)

    def score_from_state(
        self, values: torch.Tensor, state: torch.Tensor, **knobs: Any
    ) -> torch.Tensor:
        """Keep-scores of a stateful policy from its running sum ``[Hkv, n]`` alone."""
        if not self.stateful:
            raise ValueError(f"policy {self.name!r} is not stateful")
        k = self._knobs(knobs)
        return self._meta_scores(self._state_alpha(state, k), values, k)

    def score_from_state_padded(
        self,
        values: torch.Tensor | None,
        state: torch.Tensor,
        key_lengths: torch.Tensor,
        **knobs: Any,
    ) -> torch.Tensor:
        """:meth:`score_from_state` of a padded batch: ``state [B, Hkv, N]`` and ``values
        [B, Hkv, N, d]`` (row ``b``'s ``key_lengths[b]`` tokens first) give ``[B, Hkv, N]``;
        padded tokens score 0."""
        if not self.stateful:
            raise ValueError(f"policy {self.name!r} is not stateful")
        k = self._knobs(knobs)
        if state.dim() != 3:
            raise ValueError(f"state must be [B, Hkv, N], got {tuple(state.shape)}")
        key_lengths = torch.as_tensor(key_lengths, device=state.device)
        valid = torch.arange(state.shape[-1], device=state.device) < key_lengths[:, None]
        return self._meta_scores(self._state_alpha(state, k, valid), values, k, valid)

    def head_sum_length(self, n: int) -> int:
        """Length of the vector ``reduce_heads`` sums for ``n`` cached tokens (``cross_head``
        policies only)."""
        raise ValueError(f"policy {self.name!r} does not combine heads")

    # -- internals --------------------------------------------------------------
    def _knobs(self, knobs: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(knobs) - set(KNOBS))
        if unknown:
            raise TypeError(f"unknown scoring knob(s) {unknown}; valid knobs: {sorted(KNOBS)}")
        return {**self._defaults, **knobs}

    @cached_property
    def _defaults(self) -> dict[str, Any]:
        """:data:`KNOBS` with this policy's settings: made once (the policy is frozen)."""
        return {**KNOBS, **self.settings()}

    def _attention(self, keys, queries, attn, k) -> torch.Tensor:
        if attn is None:
            if queries is None:
                raise ValueError(f"policy {self.name!r} needs `queries` or `attn`")
            if self.last_query_only:
                queries = queries[:, -1:]
            return self._window_attention(queries, keys, k)
        hkv, n = keys.shape[0], keys.shape[1]
        if attn.dim() != 4 or attn.shape[0] != hkv or attn.shape[-1] != n:
            raise ValueError(f"attn must be [Hkv={hkv}, G, w, n={n}], got {tuple(attn.shape)}")
        return attn

    def _window_attention(self, queries, keys, k, key_lengths=None, query_lengths=None):
        """What the base reads of the window queries' attention: ``[*B, Hkv, G, 1, n]``, their
        weights summed over the queries (:attr:`window_mean`: averaged over each row's real
        queries), computed in bounded scratch (:func:`~vllm_caote.scoring.attention_sums`)."""
        sums = attention_sums(
            queries,
            keys,
            scale=k["scale"],
            causal=k["causal"],
            key_lengths=key_lengths,
            query_lengths=query_lengths,
        )
        if self.window_mean:
            if query_lengths is None:
                sums = sums / queries.shape[-2]
            else:
                sums = sums / query_lengths.to(sums.dtype).reshape(*query_lengths.shape, 1, 1, 1)
        return sums.unsqueeze(-2)

    def _meta_scores(self, base, values, k, valid=None) -> torch.Tensor:
        return base

    def _state_alpha(self, state, k, valid=None) -> torch.Tensor:
        """What a stateful policy scores from its running sum: the sum, neighbour-pooled."""
        return neighbours(state, k, valid)

    def _base(self, keys, values, attn, h2o_prev, sinks, k):
        """``(scores [Hkv, n], state or None)`` of one layer."""
        raise NotImplementedError

    def _base_padded(self, keys, values, attn, sinks, k, valid, query_lengths) -> torch.Tensor:
        """The base scores of a padded batch (``valid [B, N]``): ``[B, Hkv, N]``."""
        raise NotImplementedError(f"policy {self.name!r} has no padded batch form")


@dataclass(frozen=True)
class BaseScore(Policy):
    """A base score: subclasses set :attr:`name`, the flags, and implement ``_base`` (and
    ``_base_padded`` to be scored with other rows in one call); their fields are settings.

    ``_alpha`` / ``_alpha_padded`` are what a meta-score reads as ``alpha``: the base scores,
    unless a base must shift them to be non-negative (KeyDiff)."""

    def _alpha(self, keys, values, attn, h2o_prev, sinks, k):
        return self._base(keys, values, attn, h2o_prev, sinks, k)

    def _alpha_padded(self, keys, values, attn, sinks, k, valid, query_lengths):
        return self._base_padded(keys, values, attn, sinks, k, valid, query_lengths)
