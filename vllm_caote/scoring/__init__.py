"""Eviction scoring for vllm-caote: pure, batched torch functions (no global state).

Shapes: ``keys``/``values`` ``[Hkv, n, d]``; ``queries`` ``[Hq, w, d]`` with
``Hq = Hkv * G`` (query head ``h`` reads KV head ``h // G``); attention
``[Hkv, G, w, n]``; every scorer returns ``[Hkv, n]`` (higher = keep).
Computation is float32 (float64 if an input is float64) on the inputs' device.
"""

from . import chunking
from .attention import attention_sums, attention_weights
from .base import (
    h2o_scores,
    keydiff_scores,
    pool_tokens,
    snapkv_scores,
    streaming_scores,
    tova_scores,
)
from .bases import H2O, TOVA, ExpectedAttention, KeyDiff, SnapKV, StreamingLLM
from .batched import batchable, buckets, pad_rows, score_rows
from .caote import caote_attention_scores, caote_scores, fast_caote_scores
from .expected import (
    QueryMoments,
    expected_attention_scores,
    mean_rotation,
    query_moments,
    rope_rotate,
)
from .meta import CAOTE, FastCAOTE
from .policy import KNOBS, BaseScore, Policy
from .registry import DEFAULT_POLICY, POLICIES, get_policy, policy_names
from .select import recent_window, segment_ids, select_keep, select_keep_segments

__all__ = [
    "CAOTE",
    "DEFAULT_POLICY",
    "H2O",
    "KNOBS",
    "POLICIES",
    "TOVA",
    "BaseScore",
    "ExpectedAttention",
    "FastCAOTE",
    "KeyDiff",
    "Policy",
    "QueryMoments",
    "SnapKV",
    "StreamingLLM",
    "attention_sums",
    "attention_weights",
    "batchable",
    "buckets",
    "caote_attention_scores",
    "caote_scores",
    "chunking",
    "expected_attention_scores",
    "fast_caote_scores",
    "get_policy",
    "h2o_scores",
    "keydiff_scores",
    "mean_rotation",
    "pad_rows",
    "policy_names",
    "pool_tokens",
    "query_moments",
    "recent_window",
    "rope_rotate",
    "score_rows",
    "segment_ids",
    "select_keep",
    "select_keep_segments",
    "snapkv_scores",
    "streaming_scores",
    "tova_scores",
]
