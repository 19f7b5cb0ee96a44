"""Named eviction policies (kvpress-style): one small frozen dataclass per method.

A policy turns one layer's cache (and, when it needs them, the window queries or
their attention weights) into ``[Hkv, n]`` keep-scores; the engine then calls
:func:`~vllm_caote.scoring.select_keep`. Policies hold no state: H2O-based
policies are ``stateful`` and hand the updated running attention sum back to the
caller (:meth:`Policy.score_with_state` / :meth:`Policy.accumulate`), which stores
it per request and layer and compacts it together with the cache.

``CAOTE-X`` / ``FastCAOTE-X`` use the base scores of ``X`` as ``alpha`` (normalised
to sum to 1 per KV head): the pooled SnapKV scores, TOVA's last-query attention,
or H2O's accumulated attention.

H2O, TOVA, KeyDiff and Expected Attention scores are pooled over neighbouring tokens like
SnapKV's (knob ``pool_neighbours``, on by default): a kept token keeps its neighbours. With the
knob off the scores are the papers' (and kvpress's). What pooling and spans do to accuracy and
perplexity is measured in docs/policies.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from .attention import attention_sums
from .base import (
    h2o_scores,
    keydiff_scores,
    pool_tokens,
    snapkv_scores,
    streaming_scores,
    tova_scores,
)
from .caote import caote_scores, fast_caote_scores
from .expected import expected_attention_scores, query_moments

DEFAULT_POLICY = "caote-snapkv"

#: Tunable knobs accepted by :meth:`Policy.score` and their defaults. A policy
#: ignores the knobs it does not use, so the engine can pass one set to any policy.
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
    }
)

_METAS = (None, "caote", "fast-caote")


def _knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise TypeError(f"unknown scoring knob(s) {unknown}; valid knobs: {sorted(KNOBS)}")
    return {**KNOBS, **knobs}


def _neighbours(
    scores: torch.Tensor, k: dict[str, Any], valid: torch.Tensor | None = None
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
    """Base class. ``meta`` is None (plain X), ``"caote"`` or ``"fast-caote"``.

    Class-level flags:
        needs_attention: the scores depend on attention weights of the window
            queries (pass ``attn`` ``[Hkv, G, w, n]``, or ``queries`` to compute it).
        needs_queries: the policy cannot run without ``queries`` or ``attn``.
        stateful: the policy keeps a running per-token sum across calls (H2O).
        nonnegative: base scores are >= 0, so CAOTE can use them as ``alpha``.
    """

    name: str
    meta: str | None = None

    needs_attention: ClassVar[bool] = False
    needs_queries: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
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
    #: ``_base`` reads the window queries' attention averaged over them (SnapKV), not summed
    window_mean: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.meta not in _METAS:
            raise ValueError(f"meta must be one of {_METAS}, got {self.meta!r}")
        if self.meta is not None and not self.nonnegative:
            raise ValueError(f"{type(self).__name__} scores can be negative: no CAOTE meta-score")

    @property
    def needs_values(self) -> bool:
        """CAOTE variants read the cached values."""
        return self.meta is not None

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
        k = _knobs(knobs)
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
        k = _knobs(knobs)
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

    def _meta_scores(self, base, values, k, valid=None) -> torch.Tensor:
        if self.meta == "caote":
            return caote_scores(base, values, eps=k["eps"], valid=valid)
        if self.meta == "fast-caote":
            return fast_caote_scores(base, values, eps=k["eps"], valid=valid)
        return base

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
        k = _knobs(knobs)
        base = _neighbours(state, k)
        if self.meta == "caote":
            return caote_scores(base, values, eps=k["eps"])
        if self.meta == "fast-caote":
            return fast_caote_scores(base, values, eps=k["eps"])
        return base

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
        k = _knobs(knobs)
        if state.dim() != 3:
            raise ValueError(f"state must be [B, Hkv, N], got {tuple(state.shape)}")
        key_lengths = torch.as_tensor(key_lengths, device=state.device)
        valid = torch.arange(state.shape[-1], device=state.device) < key_lengths[:, None]
        base = _neighbours(state, k, valid)
        return self._meta_scores(base, values, k, valid)

    # -- internals --------------------------------------------------------------
    def _attention(
        self,
        keys: torch.Tensor,
        queries: torch.Tensor | None,
        attn: torch.Tensor | None,
        k: dict[str, Any],
    ) -> torch.Tensor:
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
        """What ``_base`` reads of the window queries' attention: ``[*B, Hkv, G, 1, n]``, their
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

    def _base(
        self, keys, values, attn, h2o_prev, sinks, k
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _base_padded(self, keys, values, attn, sinks, k, valid, query_lengths) -> torch.Tensor:
        """:meth:`_base` of a padded batch (``valid [B, N]``): ``[B, Hkv, N]``."""
        raise NotImplementedError(f"policy {self.name!r} has no padded batch form")


@dataclass(frozen=True)
class StreamingPolicy(Policy):
    """StreamingLLM: sinks + most recent tokens (position only)."""

    def _base(self, keys, values, attn, h2o_prev, sinks, k):
        return streaming_scores(keys, sinks=sinks), None

    def _base_padded(self, keys, values, attn, sinks, k, valid, query_lengths):
        return streaming_scores(keys, sinks=sinks)  # position only: padding changes nothing


@dataclass(frozen=True)
class KeyDiffPolicy(Policy):
    """KeyDiff: ``-cos(k_j, mean unit key)``, neighbour-pooled; no queries, no attention.

    As a CAOTE base it is shifted to ``1 - cos`` (>= 0, the same ranking): CAOTE-KeyDiff weighs
    each token's distance from the mean key by how far its value is from the output."""

    nonnegative: ClassVar[bool] = True  # for the CAOTE forms, after the shift

    def _base(self, keys, values, attn, h2o_prev, sinks, k):
        scores = keydiff_scores(keys, normalize_anchor=k["normalize_anchor"])
        if self.meta is not None:
            scores = scores + 1.0
        return _neighbours(scores, k), None

    def _base_padded(self, keys, values, attn, sinks, k, valid, query_lengths):
        scores = keydiff_scores(keys, normalize_anchor=k["normalize_anchor"], valid=valid)
        if self.meta is not None:
            scores = scores + 1.0
        return _neighbours(scores, k, valid)


@dataclass(frozen=True)
class H2OPolicy(Policy):
    """H2O: accumulated attention (running sum kept by the caller), neighbour-pooled."""

    needs_attention: ClassVar[bool] = True
    needs_queries: ClassVar[bool] = True
    stateful: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True

    def _base(self, keys, values, attn, h2o_prev, sinks, k):
        acc = h2o_scores(attn, h2o_prev)
        return _neighbours(acc, k), acc  # the state stays the plain running sum


@dataclass(frozen=True)
class TOVAPolicy(Policy):
    """TOVA: last query's attention, averaged over the heads, neighbour-pooled."""

    cross_head: ClassVar[bool] = True
    needs_attention: ClassVar[bool] = True
    needs_queries: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True
    last_query_only: ClassVar[bool] = True

    def _base(self, keys, values, attn, h2o_prev, sinks, k):
        scores = tova_scores(attn, head_average=k["head_average"], reduce_heads=k["reduce_heads"])
        return _neighbours(scores, k), None

    def _base_padded(self, keys, values, attn, sinks, k, valid, query_lengths):
        scores = tova_scores(
            attn, head_average=k["head_average"], reduce_heads=k["reduce_heads"], valid=valid
        )
        return _neighbours(scores, k, valid)

    @staticmethod
    def head_sum_length(n: int) -> int:
        """Length of the vector ``reduce_heads`` sums for ``n`` cached tokens."""
        return n + 1


@dataclass(frozen=True)
class SnapKVPolicy(Policy):
    """SnapKV: window-voted attention, pooled over tokens, averaged over the group; kept in
    spans of 3 tokens either side (see ``select_keep``)."""

    span: ClassVar[int] = 3
    window_mean: ClassVar[bool] = True

    needs_attention: ClassVar[bool] = True
    needs_queries: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True

    def _base(self, keys, values, attn, h2o_prev, sinks, k):
        return snapkv_scores(attn, kernel_size=k["kernel_size"], pooling=k["pooling"]), None

    def _base_padded(self, keys, values, attn, sinks, k, valid, query_lengths):
        # attn is already the mean over each row's real queries (window_mean)
        return snapkv_scores(attn, kernel_size=k["kernel_size"], pooling=k["pooling"], valid=valid)


@dataclass(frozen=True)
class ExpectedAttentionPolicy(Policy):
    """Expected Attention (kvpress ``ExpectedAttentionPress``): the softmax of the future
    queries' expected logits, from the moments of every query so far moved to the next
    positions by the average RoPE rotation, times ``||v||``; neighbour-pooled. Query-agnostic:
    it does not need the question to be in the window, only the query distribution."""

    needs_queries: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True
    tracks_queries: ClassVar[bool] = True

    def _base(self, keys, values, attn, h2o_prev, sinks, k):
        mean, cov = k["query_moments"]
        scores = expected_attention_scores(
            keys,
            values,
            mean,
            cov if k["use_covariance"] else None,
            rotation=k["future_rotation"],
            scale=k["scale"],
            use_vnorm=k["use_vnorm"],
        )
        return _neighbours(scores, k), None


def _build() -> dict[str, Policy]:
    out: dict[str, Policy] = {}
    for meta, prefix in (("caote", "caote-"), ("fast-caote", "fast-caote-")):
        for cls, base in ((SnapKVPolicy, "snapkv"), (H2OPolicy, "h2o"), (TOVAPolicy, "tova")):
            out[prefix + base] = cls(name=prefix + base, meta=meta)
    out["snapkv"] = SnapKVPolicy(name="snapkv")
    out["h2o"] = H2OPolicy(name="h2o")
    out["tova"] = TOVAPolicy(name="tova")
    for meta, prefix in ((None, ""), ("caote", "caote-"), ("fast-caote", "fast-caote-")):
        name = prefix + "expected-attention"
        out[name] = ExpectedAttentionPolicy(name=name, meta=meta)
    out["keydiff"] = KeyDiffPolicy(name="keydiff")
    out["caote-keydiff"] = KeyDiffPolicy(name="caote-keydiff", meta="caote")
    out["fast-caote-keydiff"] = KeyDiffPolicy(name="fast-caote-keydiff", meta="fast-caote")
    out["streaming"] = StreamingPolicy(name="streaming")
    return out


#: name -> policy instance. Treat as read-only.
POLICIES: dict[str, Policy] = _build()


def policy_names() -> list[str]:
    """Valid policy names, in registry order (CAOTE variants first)."""
    return list(POLICIES)


def get_policy(name: str) -> Policy:
    """Look up a policy by name (case-insensitive, ``_`` accepted for ``-``).

    Raises:
        ValueError: unknown name; the message lists the valid names.
    """
    key = str(name).strip().lower().replace("_", "-")
    try:
        return POLICIES[key]
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; valid policies: {', '.join(policy_names())}"
        ) from None
