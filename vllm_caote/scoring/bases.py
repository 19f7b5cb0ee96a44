"""The base scores, one small frozen dataclass each; their fields are their settings.

``SnapKV()``, ``TOVA()``, ``H2O()``, ``KeyDiff()``, ``ExpectedAttention()`` and
``StreamingLLM()`` score alone or under :class:`~vllm_caote.scoring.meta.CAOTE` /
:class:`~vllm_caote.scoring.meta.FastCAOTE`. H2O, TOVA, KeyDiff and Expected Attention pool
their per-token scores over neighbours like SnapKV's (``pool_neighbours``, on by default): a
kept token keeps its neighbours; with it off the scores are the papers' (and kvpress's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import h2o_scores, keydiff_scores, snapkv_scores, streaming_scores, tova_scores
from .expected import expected_attention_scores
from .policy import BaseScore, neighbours


@dataclass(frozen=True)
class StreamingLLM(BaseScore):
    """StreamingLLM: sinks + most recent tokens (position only)."""

    name: ClassVar[str] = "streaming"

    def _base(self, keys, values, attn, h2o_prev, sinks, k):
        return streaming_scores(keys, sinks=sinks), None

    def _base_padded(self, keys, values, attn, sinks, k, valid, query_lengths):
        return streaming_scores(keys, sinks=sinks)  # position only: padding changes nothing


@dataclass(frozen=True)
class NeighbourPooled(BaseScore):
    """A per-token score pooled over neighbouring tokens with SnapKV's kernel (a kept token
    keeps its neighbours); ``pool_neighbours=False`` gives the paper's (and kvpress's) score."""

    pool_neighbours: bool = True
    kernel_size: int = 7
    pooling: str = "avg"


@dataclass(frozen=True)
class KeyDiff(NeighbourPooled):
    """KeyDiff: ``-cos(k_j, mean unit key)``, neighbour-pooled; no queries, no attention.

    As a CAOTE base it is shifted to ``1 - cos`` (>= 0, the same ranking): CAOTE-KeyDiff weighs
    each token's distance from the mean key by how far its value is from the output."""

    normalize_anchor: bool = True  # anchor = mean of unit keys (paper, kvpress)
    name: ClassVar[str] = "keydiff"
    nonnegative: ClassVar[bool] = True  # for the CAOTE forms, after the shift

    def _scores(self, keys, k, valid=None, shift=0.0):
        scores = keydiff_scores(keys, normalize_anchor=k["normalize_anchor"], valid=valid)
        return neighbours(scores + shift if shift else scores, k, valid)

    def _base(self, keys, values, attn, h2o_prev, sinks, k):
        return self._scores(keys, k), None

    def _base_padded(self, keys, values, attn, sinks, k, valid, query_lengths):
        return self._scores(keys, k, valid)

    def _alpha(self, keys, values, attn, h2o_prev, sinks, k):
        return self._scores(keys, k, shift=1.0), None

    def _alpha_padded(self, keys, values, attn, sinks, k, valid, query_lengths):
        return self._scores(keys, k, valid, shift=1.0)


@dataclass(frozen=True)
class H2O(NeighbourPooled):
    """H2O: accumulated attention (running sum kept by the caller), neighbour-pooled."""

    name: ClassVar[str] = "h2o"
    needs_attention: ClassVar[bool] = True
    needs_queries: ClassVar[bool] = True
    stateful: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True

    def _base(self, keys, values, attn, h2o_prev, sinks, k):
        acc = h2o_scores(attn, h2o_prev)
        return neighbours(acc, k), acc  # the state stays the plain running sum


@dataclass(frozen=True)
class TOVA(NeighbourPooled):
    """TOVA: last query's attention, averaged over the heads, neighbour-pooled."""

    head_average: bool = True  # averaged over all heads (kvpress)
    name: ClassVar[str] = "tova"
    cross_head: ClassVar[bool] = True
    needs_attention: ClassVar[bool] = True
    needs_queries: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True
    last_query_only: ClassVar[bool] = True

    def _base(self, keys, values, attn, h2o_prev, sinks, k):
        scores = tova_scores(attn, head_average=k["head_average"], reduce_heads=k["reduce_heads"])
        return neighbours(scores, k), None

    def _base_padded(self, keys, values, attn, sinks, k, valid, query_lengths):
        scores = tova_scores(
            attn, head_average=k["head_average"], reduce_heads=k["reduce_heads"], valid=valid
        )
        return neighbours(scores, k, valid)

    def head_sum_length(self, n: int) -> int:
        return n + 1  # the n per-token head sums, then the head count


@dataclass(frozen=True)
class SnapKV(BaseScore):
    """SnapKV: window-voted attention, pooled over tokens, averaged over the group; kept in
    spans of ``span`` tokens either side (see ``select_keep``)."""

    kernel_size: int = 7
    pooling: str = "avg"
    span: int = 3  # type: ignore[misc]  # a setting here, a class flag elsewhere

    name: ClassVar[str] = "snapkv"
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
class ExpectedAttention(NeighbourPooled):
    """Expected Attention (kvpress ``ExpectedAttentionPress``): the softmax of the future
    queries' expected logits, from the moments of every query so far moved to the next
    positions by the average RoPE rotation, times ``||v||``; neighbour-pooled. Query-agnostic:
    it does not need the question to be in the window, only the query distribution."""

    use_covariance: bool = True
    use_vnorm: bool = True
    name: ClassVar[str] = "expected-attention"
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
        return neighbours(scores, k), None
