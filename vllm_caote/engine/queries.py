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
them).
"""

from __future__ import annotations

import numpy as np
import torch


class QueryRings:
    def __init__(self, window: int, device) -> None:
        self.window = window
        self.device = device
        self.slot_of: dict[str, int] = {}
        self.recorded: dict[str, int] = {}  # queries written per request (all layers alike)
        self._free: list[int] = []
        self._capacity = 0  # slots handed out so far (ring tensors grow to it lazily)
        self.rings: dict[str, torch.Tensor] = {}
        # this step's copy: rows of the step's query tensor -> flat ring rows (slot * w + pos)
        self._src: torch.Tensor | None = None
        self._dst: torch.Tensor | None = None

    def release(self, req_id: str) -> None:
        slot = self.slot_of.pop(req_id, None)
        self.recorded.pop(req_id, None)
        if slot is not None:
            self._free.append(slot)

    def _slot(self, req_id: str) -> int:
        slot = self.slot_of.get(req_id)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            else:
                slot, self._capacity = self._capacity, self._capacity + 1
            self.slot_of[req_id] = slot
        return slot

    def plan_step(self, rows) -> None:
        """Where this step's queries go: ``rows`` are ``(req_id, q_start, q_end, seen_before)``
        of the requests that record (only the last ``w`` of each step's tokens matter)."""
        w = self.window
        src, dst = [], []
        for req_id, q_start, q_end, seen_before in rows:
            n = q_end - q_start
            m = min(n, w)
            slot = self._slot(req_id)
            self.recorded[req_id] = self.recorded.get(req_id, 0) + n
            src.append(np.arange(q_end - m, q_end))
            dst.append(slot * w + (seen_before + n - m + np.arange(m)) % w)
        if not src:
            self._src = self._dst = None
            return
        self._src = torch.from_numpy(np.concatenate(src)).to(self.device)
        self._dst = torch.from_numpy(np.concatenate(dst)).to(self.device)

    def record(self, layer: str, query: torch.Tensor) -> None:
        """Write this step's queries ``[num_tokens, Hq, d]`` of one layer into its ring."""
        if self._src is None:
            return
        ring = self.rings.get(layer)
        hq, d = query.shape[1], query.shape[2]
        if ring is None or ring.shape[0] < self._capacity:  # a new slot: grow (doubling)
            have = 0 if ring is None else ring.shape[0]
            grown = query.new_zeros(max(self._capacity, 2 * have), self.window, hq, d)
            if ring is not None:
                grown[:have] = ring
            ring = self.rings[layer] = grown
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
