"""Bounded scratch for one layer's scoring: the work is done in chunks along the token axis.

vLLM's memory profiler never sees the scoring, so nothing in it may grow as ``queries x
tokens`` or ``tokens x head_dim`` in float32 over a whole cache. Every scorer walks the cached
tokens in chunks of at most :data:`SCORE_CHUNK_TOKENS` padded tokens (rows x tokens of a
padded batch) and the queries in chunks of at most :data:`SCORE_CHUNK_QUERIES`; softmaxes over
the tokens take two passes (log-sum-exp per chunk, then normalised weights), so a chunked
result equals the one-chunk result up to float rounding. What stays whole is score-sized
(``Hq x n`` float32 at most: per-head attention sums, scores).

Stated bound (float32 compute, ``Hq`` query heads, ``Hkv`` KV heads, head size ``d``, window
``w <= SCORE_CHUNK_QUERIES``, ``T = SCORE_CHUNK_TOKENS``): one chunk holds its logits and one
temporary of their size (``2 * Hq * w * T * 4`` bytes; the softmax passes work in place), a
float32 copy of the chunk's keys or values and one more (a matmul's contiguous operand:
``2 * Hkv * T * d * 4``), and ``w * T`` bytes of masks. At Llama-3.1-8B shapes (``Hq = 32``,
``Hkv = 8``, ``d = 128``, ``w = 64``, ``T = 4096``) that is :func:`chunk_scratch_bytes` =
96 MiB (100,663,296 bytes) plus 256 KiB of masks, whatever the cache length. Score-sized
tensors add ``Hq * n * 4`` bytes per row (4 MiB at 32k tokens). The padded batch itself
(``score_rows``'s copies of several rows' keys and values, in the model dtype; none for a
lone row) is bounded separately by the engine's ``MAX_BATCH_TOKENS``.
"""

from __future__ import annotations

#: padded tokens (rows x tokens) one chunk of a layer's scoring reads at once
SCORE_CHUNK_TOKENS = 4096
#: queries one chunk of attention holds (a window of up to 64 is one chunk; H2O's step
#: queries, a whole prefill chunk, are walked 64 at a time)
SCORE_CHUNK_QUERIES = 64


def token_chunks(n: int, rows: int = 1) -> list[slice]:
    """Slices of ``range(n)`` covering it in order, each at most ``SCORE_CHUNK_TOKENS // rows``
    tokens wide (at least 1): ``rows`` padded rows of one chunk hold at most
    :data:`SCORE_CHUNK_TOKENS` tokens. Read at call time, so tests can shrink the constant."""
    width = max(1, SCORE_CHUNK_TOKENS // max(rows, 1))
    return [slice(s, min(s + width, n)) for s in range(0, n, width)] or [slice(0, 0)]


def query_chunks(w: int) -> list[slice]:
    """Slices of ``range(w)`` of at most :data:`SCORE_CHUNK_QUERIES` queries each."""
    width = max(1, SCORE_CHUNK_QUERIES)
    return [slice(s, min(s + width, w)) for s in range(0, w, width)] or [slice(0, 0)]


def chunk_scratch_bytes(
    q_heads: int = 32,
    kv_heads: int = 8,
    head_size: int = 128,
    window: int = 64,
    element_size: int = 4,
) -> int:
    """The stated bound on one chunk's scratch (see the module doc; masks aside) for the given
    shapes: two logits-sized tensors and two float copies of a chunk of keys or values.
    Defaults: Llama-3.1-8B, window 64, float32."""
    t = SCORE_CHUNK_TOKENS
    w = min(window, SCORE_CHUNK_QUERIES)
    logits = q_heads * w * t * element_size
    cache_chunk = kv_heads * t * head_size * element_size
    return 2 * logits + 2 * cache_chunk
