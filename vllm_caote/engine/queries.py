"""The observation window: the newest queries of every budgeted request, per layer.

Query-aware policies (SnapKV, TOVA and their CAOTE forms) score the cache against the last
``w`` queries of the request, so every step must keep them, in every layer, for every budgeted
request, whether or not it evicts. That runs 30-odd times per step on the decode path, so it is
one ``index_select`` + one ``index_copy_`` per layer for the whole batch: each request owns a
*slot* of a per-layer ring tensor ``[slots, w, Hq, d]``, and the step's source rows and ring
positions are computed once per step (:meth:`QueryRings.plan_step`), not per layer.

Invariant: after a step in which request ``r`` computed tokens ``0 .. t-1`` (its first step
with a plan counting as token 0 of what it recorded), ``ring[slot(r), p % w]`` holds, in every
layer, the query of token ``p`` for each of the last ``min(w, recorded)`` tokens ``p < t``.
Tokens read from the prefix cache were never computed and have no query (``recorded`` excludes
them). If a step's record failed, the rows that recorded in it are failed by the caller (their
requests restart, which releases their slots).

Memory: a layer's ring is allocated once, at its first record, for ``slots`` requests (the
engine's ``max_num_seqs``: slots are released when a request finishes, is preempted or restarts,
so the running batch never needs more), and never grows inside the forward pass.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger("vllm.vllm_caote.engine")


class QueryRings:
    def __init__(self, window: int, device, slots: int = 256) -> None:
        self.window = window
        self.device = device
        self.slots = slots  # ring rows per layer, allocated at the layer's first record
        self.slot_of: dict[str, int] = {}
        self.recorded: dict[str, int] = {}  # queries written per request (all layers alike)
        self._free: list[int] = []
        self._capacity = 0  # slots handed out so far (at most ``slots``)
        self.rings: dict[str, torch.Tensor] = {}
        # this step's copy: rows of the step's query tensor -> flat ring rows (slot * w + pos)
        self._src: torch.Tensor | None = None
        self._dst: torch.Tensor | None = None

    def release(self, req_id: str) -> None:
        slot = self.slot_of.pop(req_id, None)
        self.recorded.pop(req_id, None)
        if slot is not None:
            self._free.append(slot)

    def _slot(self, req_id: str) -> int | None:
        slot = self.slot_of.get(req_id)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            elif self._capacity < self.slots:
                slot, self._capacity = self._capacity, self._capacity + 1
            else:
                return None  # every slot taken (cannot happen while slots >= running requests)
            self.slot_of[req_id] = slot
        return slot

    def plan_step(self, rows) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Where this step's queries go: ``rows`` are ``(req_id, q_start, q_end, seen_before)``
        of the requests that record (only the last ``w`` of each step's tokens matter).

        Returns host arrays ``(src, dst)`` (rows of the step's query tensor, flat ring rows),
        which the caller copies to the device with the step's other inputs and hands to
        :meth:`use`, and the requests that got no slot (they cannot record: fail them)."""
        w = self.window
        src, dst, unslotted = [], [], []
        self._src = self._dst = None
        for req_id, q_start, q_end, seen_before in rows:
            n = q_end - q_start
            m = min(n, w)
            slot = self._slot(req_id)
            if slot is None:
                unslotted.append(req_id)
                continue
            self.recorded[req_id] = self.recorded.get(req_id, 0) + n
            src.append(np.arange(q_end - m, q_end))
            dst.append(slot * w + (seen_before + n - m + np.arange(m)) % w)
        return _cat(src), _cat(dst), unslotted

    def use(self, src: torch.Tensor | None, dst: torch.Tensor | None) -> None:
        """This step's copy on the device (:meth:`plan_step`'s arrays; None: nothing records)."""
        live = src is not None and dst is not None and src.numel() > 0
        self._src, self._dst = (src, dst) if live else (None, None)

    def record(self, layer: str, query: torch.Tensor) -> None:
        """Write this step's queries ``[num_tokens, Hq, d]`` of one layer into its ring."""
        if self._src is None:
            return
        ring = self.rings.get(layer)
        hq, d = query.shape[1], query.shape[2]
        if ring is None:  # once per layer, for every slot: never grown in the forward
            ring = self.rings[layer] = query.new_zeros(self.slots, self.window, hq, d)
        ring.view(-1, hq, d).index_copy_(0, self._dst, query.index_select(0, self._src))

    def window_queries(self, req_id: str, layer: str, total: int) -> torch.Tensor | None:
        """The request's last ``min(w, recorded)`` queries of ``layer``, oldest first:
        ``[Hq, w', d]``; ``total`` is its true token count after this step."""
        ring = self.rings.get(layer)
        recorded = self.recorded.get(req_id, 0)
        if ring is None or recorded == 0 or req_id not in self.slot_of:
            return None
        w = min(self.window, recorded)
        order = torch.arange(total - w, total, device=ring.device) % self.window
        return ring[self.slot_of[req_id]].index_select(0, order).transpose(0, 1)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def records(policy) -> bool:
    """Requests of ``policy`` keep their window queries in the rings (query-aware, stateless:
    H2O and Expected Attention fold the queries into their own state instead)."""
    return policy.needs_queries and not (policy.stateful or policy.tracks_queries)


def layer_queries(rows, rings: QueryRings, name: str, query: torch.Tensor, layer):
    """One layer's queries as scoring reads them (fp8 ones dequantised), recorded into the
    rings for every recording row at once; ``rows`` are the step's budgeted rows
    (``engine.step.RowWork``).

    An exception here (an allocation: the ring's first record, an fp8 query's float copy)
    fails only the rows that needed the queries (their ``error``: the scheduler recomputes
    them without eviction) and returns None if no queries could be read; the other rows and
    the engine go on."""
    from vllm_caote.engine.compaction import dequantize_queries

    try:
        query = dequantize_queries(query, layer)
    except Exception as e:  # noqa: BLE001 - reported per request to the scheduler
        reads = [
            w
            for w in rows
            if w.policy.needs_queries or w.policy.stateful or w.policy.tracks_queries
        ]
        _fail(reads, f"{type(e).__name__} reading the queries of {name}: {e}")
        return None
    try:
        rings.record(name, query)
    except Exception as e:  # noqa: BLE001 - reported per request to the scheduler
        _fail(
            [w for w in rows if records(w.policy)],
            f"{type(e).__name__} recording window queries in {name}: {e}",
        )
    return query


def _fail(rows, reason: str) -> None:
    if rows:
        logger.exception("vllm-caote: %s (failing %d request(s))", reason, len(rows))
    for work in rows:
        work.error = work.error or reason
