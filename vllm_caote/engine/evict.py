"""One layer's compactions: every row that evicts in the step scored in one call, then each
request's selection and compaction.

Invariants:

* where a request's tokens lie in the paged cache (block and slot of each token) is the same in
  every layer of a step: it is worked out once per step (:func:`token_index`, kept on the row),
  so a layer reads a request with one gather per key/value plane and writes it with one gather
  and one scatter per plane (:mod:`vllm_caote.engine.compaction`);
* the rows a step evicts, grouped by the policy that scores them, are scored by one call per
  layer: stateless policies read every row with one gather per plane into ``[R, Hkv, N, d]``
  padded to the longest (:func:`_compact_padded`, then
  :func:`~vllm_caote.scoring.batched.score_padded_rows`), others through
  :func:`~vllm_caote.scoring.score_rows`; one batch while the padded scratch stays under
  :data:`MAX_BATCH_TOKENS` tokens, so a layer's launches do not grow with the number of
  requests that evict (only with their padded tokens, walked in bounded chunks:
  :mod:`vllm_caote.scoring.chunking`); each row's scores, and so its kept tokens, are those of
  the per-row path on the same tensors (``tests/scoring/test_scoring_batched.py``,
  ``tests/test_evict_paths.py``);
* selection (per request and KV head) and the write into the request's own blocks stay per
  request: the protected head (shared prefix-cache blocks) is never written;
* a failure costs only the rows it touched: a batched call that raises is retried row by row,
  each contained, and a row that fails is reported failed (the scheduler recomputes it without
  eviction), never the engine or another request;
* a cross-rank head sum (TOVA under tensor parallelism) is joined exactly once per row and
  layer on every rank: such rows are scored one by one, in the same order on every rank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vllm_caote.engine import compaction, observe
from vllm_caote.engine.state import LayerState, moment_knobs
from vllm_caote.scoring import batchable, buckets, recent_window, score_rows, select_keep
from vllm_caote.scoring.batched import score_padded_rows

logger = logging.getLogger("vllm.vllm_caote.engine")

#: padded tokens (rows x longest row) one batched scoring call may hold: its padded copies of the
#: rows' keys and values are ``2 * MAX_BATCH_TOKENS * Hkv * d`` elements in the model dtype
#: (Llama-3.1-8B, bf16: 256 MiB; a lone row is not copied); past it the rows are split into more
#: calls. The scoring's own scratch is bounded apart from it, whatever the lengths
#: (:mod:`vllm_caote.scoring.chunking`: at most 96 MiB at 8B shapes)
MAX_BATCH_TOKENS = 65536


@dataclass
class Evicting:
    """A row that compacts in this layer: its cache as read, and its cross-rank head sum."""

    work: object  # step.RowWork
    joint: object  # ranks._HeadSum
    cache: tuple | None = None  # (raw_k, raw_v, k, v), each [Hkv, n, d]


def read(layout, kv_cache, work, impl, layer) -> tuple:
    """The request's cache as stored and dequantised for scoring: ``(raw_k, raw_v, k, v)``,
    each ``[Hkv, n, d]``; the raw ones are copies (never views of the cache)."""
    planes = _planes(impl, layout, kv_cache)
    if planes is not None:  # one gather per plane, through the step's token index
        index = token_index(work, kv_cache)
        raw_k, raw_v = (compaction.gather_tokens(p, index) for p in planes)
    else:
        raw_k, raw_v = layout.read(kv_cache, work.block_ids, work.cache_len)
    return (
        raw_k,
        raw_v,
        *compaction.dequantize(raw_k, raw_v, str(getattr(impl, "kv_cache_dtype", "auto")), layer),
    )


def _planes(impl, layout, kv_cache):
    """``layout.planes(kv_cache)``, kept on the attention impl while its cache is the same
    (the views are made once per layer, not once per eviction)."""
    key = (kv_cache.data_ptr(), tuple(kv_cache.shape), kv_cache.stride(), id(layout))
    held = getattr(impl, "_caote_planes", None)
    if held is not None and held[0] == key:
        return held[1]
    planes = layout.planes(kv_cache)
    try:
        impl._caote_planes = (key, planes)
    except AttributeError:  # an impl that takes no attributes: made again next time
        pass
    return planes


def token_index(work, kv_cache) -> compaction.TokenIndex:
    """Where ``work``'s tokens are in the paged cache: the same in every layer of the step, so
    made by the first layer that reads them and kept on the row (``RowWork.index``)."""
    bs, heads = kv_cache.shape[2], kv_cache.shape[1]
    key = (bs, heads, kv_cache.device)
    index = work.index.get(key)
    if index is None:
        index = work.index[key] = compaction.TokenIndex.of(
            work.block_ids, work.cache_len, bs, heads
        )
    return index


def layer_state(ev, work, name: str) -> LayerState:
    return ev.request(work.req_id).layers.setdefault(name, LayerState())


def compact_layer(ev, rows: list[Evicting], name: str, impl, layer, layout, kv_cache) -> None:
    """Score, select and compact every row of ``rows`` in this layer (see the module doc)."""
    groups: dict[str, list[Evicting]] = {}
    for item in rows:
        groups.setdefault(item.work.scorer.name, []).append(item)
    for items in groups.values():
        items = [it for it in items if it.work.error is None]
        if len(items) > 1:  # read and scored padded together; what is left goes row by row
            items = _compact_padded(ev, items, name, impl, layer, layout, kv_cache)
        for item in items:
            _contained(item, name, _read_once, layout, kv_cache, impl, layer)
        items = [it for it in items if it.work.error is None]
        scores = _batched(ev, items, name, impl) if len(items) > 1 else None
        for i, item in enumerate(items):
            s = None if scores is None else scores[i]
            _contained(item, name, _compact_one, ev, s, name, impl, layout, kv_cache)


def _compact_padded(ev, items: list[Evicting], name: str, impl, layer, layout, kv_cache):
    """Rows of one stateless scorer read with one gather per plane into ``[R, Hkv, N, d]``
    (padded to the longest row, :class:`~vllm_caote.engine.compaction.PaddedIndex`) and
    scored by one call per bucket of at most :data:`MAX_BATCH_TOKENS` padded tokens; each
    row then selected and written (contained). Returns the rows left to the per-row path:
    all of them where this does not apply, those of a bucket whose read or scoring raised."""
    policy = items[0].work.scorer
    if not batchable(policy) or any(
        it.cache is not None or it.joint.ranks is not None for it in items
    ):
        return items
    planes = _planes(impl, layout, kv_cache)
    if planes is None:
        return items
    lengths = [it.work.cache_len for it in items]
    left: list[Evicting] = []
    for bucket in buckets(lengths, None, MAX_BATCH_TOKENS):
        rows = [items[i] for i in bucket]
        if len(rows) == 1:
            left += rows
            continue
        try:
            index = _padded_index(rows, kv_cache)
            raw_k, raw_v = (compaction.gather_padded(p, index) for p in planes)
            kv_dtype = str(getattr(impl, "kv_cache_dtype", "auto"))
            keys, values = compaction.dequantize(raw_k, raw_v, kv_dtype, layer)
            scores = score_padded_rows(
                policy,
                keys,
                values,
                [_queries(ev, it.work, name) for it in rows],
                [it.work.cache_len for it in rows],
                index.lengths,
                sinks=ev.settings.sinks,
                scale=getattr(impl, "scale", None),
            )
        except Exception:  # noqa: BLE001 - retried row by row, each row contained
            logger.warning("vllm-caote: batched read or scoring failed in %s; row by row", name)
            left += rows
            continue
        for j, it in enumerate(rows):
            it.cache = (raw_k[j], raw_v[j], None, None)  # [Hkv, N, d]: the row's n first
            s = scores[j, :, : it.work.cache_len]
            _contained(it, name, _compact_one, ev, s, name, impl, layout, kv_cache)
    return left


def _padded_index(rows: list[Evicting], kv_cache) -> compaction.PaddedIndex:
    """The rows' :class:`~vllm_caote.engine.compaction.PaddedIndex`, made once per step (kept
    on the first row)."""
    key = ("padded", tuple(it.work.req_id for it in rows), *kv_cache.shape[1:3], kv_cache.device)
    held = rows[0].work.index
    index = held.get(key)
    if index is None:
        index = held[key] = compaction.PaddedIndex.of(
            [token_index(it.work, kv_cache) for it in rows], [it.work.cache_len for it in rows]
        )
    return index


def _compact_one(item: Evicting, ev, scores, name: str, impl, layout, kv_cache) -> None:
    if scores is None:
        scores = _score_one(ev, item, name, impl)
    _select_and_write(ev, item, name, scores, impl, layout, kv_cache)
    item.work.layers_compacted += 1


def _contained(item: Evicting, name: str, fn, *args) -> None:
    if item.work.error is not None:
        return
    try:
        fn(item, *args)
    except Exception as e:  # noqa: BLE001 - contained per request, reported to the scheduler
        item.joint.poison()
        item.work.error = f"{type(e).__name__} in layer {name}: {e}"
        logger.exception("vllm-caote: eviction of request %s failed", item.work.req_id)


def _read_once(item: Evicting, layout, kv_cache, impl, layer) -> None:
    if item.cache is None:
        item.cache = read(layout, kv_cache, item.work, impl, layer)


def _queries(ev, work, name: str):
    policy = work.scorer
    if not policy.needs_queries or policy.tracks_queries:
        return None
    total = work.seen_before + (work.q_end - work.q_start)  # true tokens after the step
    return ev.rings.window_queries(work.req_id, name, total)


def _batched(ev, items: list[Evicting], name: str, impl) -> list[torch.Tensor] | None:
    """One scoring call for ``items`` (one scorer), or None where rows must go one by one."""
    policy = items[0].work.scorer
    if not batchable(policy) and not policy.stateful:
        return None  # Expected Attention: per-row query moments
    if any(it.joint.ranks is not None for it in items):
        return None  # one cross-rank sum per row, in the same order on every rank
    try:
        states = None
        if policy.stateful:
            states = [layer_state(ev, it.work, name).h2o for it in items]
        queries = [_queries(ev, it.work, name) for it in items]
        return score_rows(
            policy,
            [it.cache[2] for it in items],
            [it.cache[3] for it in items],
            None if all(q is None for q in queries) else queries,
            sinks=ev.settings.sinks,
            scale=getattr(impl, "scale", None),
            states=states,
            bucket_ratio=None,
            max_tokens=MAX_BATCH_TOKENS,
        )
    except Exception:  # noqa: BLE001 - retried row by row, each row contained
        logger.warning("vllm-caote: batched scoring failed in %s; scoring row by row", name)
        return None


def _score_one(ev, item: Evicting, name: str, impl) -> torch.Tensor:
    work, joint = item.work, item.joint
    policy = work.scorer
    _, _, keys, values = item.cache
    ls = layer_state(ev, work, name)
    if policy.stateful:
        return policy.score_from_state(values, ls.h2o)
    # one rank: the plain mean (bit-for-bit the single-process scores)
    knobs = {"reduce_heads": joint} if joint.ranks is not None else {}
    if policy.tracks_queries:
        total = work.seen_before + (work.q_end - work.q_start)
        knobs.update(moment_knobs(ls, ev.rope.for_layer(name), total, keys.device))
    scores, _ = policy.score_with_state(
        keys,
        values,
        queries=_queries(ev, work, name),
        sinks=ev.settings.sinks,
        scale=getattr(impl, "scale", None),
        **knobs,
    )
    return scores


def _recent(work, cfg) -> float:
    """The request's own ``kv_recent``, else the server's ``kv_eviction.recent``."""
    return cfg.recent if work.plan.recent is None else work.plan.recent


def _select_and_write(ev, item: Evicting, name: str, scores, impl, layout, kv_cache) -> None:
    work = item.work
    cfg = ev.settings
    raw_keys, raw_values, _, _ = item.cache
    # the protected head (shared prefix-cache blocks) is kept like sinks, and never written
    head = work.plan.protected
    sinks = max(cfg.sinks, head)
    keep_idx = select_keep(
        scores,
        work.plan.evict_to,
        protect_recent=recent_window(work.plan.evict_to, cfg.window, _recent(work, cfg), sinks),
        sinks=sinks,
        span=work.scorer.span,
    )
    observe.notify(work.req_id, name, work.seen_before + work.q_end - work.q_start, work.cache_len, keep_idx)  # fmt: skip
    moved = keep_idx[:, head:] if head else keep_idx
    bs = kv_cache.shape[2]
    # the stored (possibly quantised) bytes move; nothing is re-quantised
    planes = _planes(impl, layout, kv_cache)
    if planes is not None:
        index = token_index(work, kv_cache)
        start = (head // bs) * bs
        compaction.scatter_tokens(planes[0], index, start, raw_keys, moved)
        compaction.scatter_tokens(planes[1], index, start, raw_values, moved)
    else:
        layout.write(
            kv_cache,
            work.block_ids[head // bs :],
            compaction.take_tokens(raw_keys, moved),
            compaction.take_tokens(raw_values, moved),
        )
    ls = layer_state(ev, work, name)
    if ls.h2o is not None:
        ls.h2o = torch.gather(ls.h2o, 1, keep_idx.to(ls.h2o.device))
