"""The worker side of kept conversation caches: the per-request state of stateful policies.

When the scheduler keeps a finished budgeted request's compacted cache (:mod:`.sessions`) and
its policy carries worker state (H2O's running sums, Expected Attention's query moments), the
worker keeps that request's :class:`~vllm_caote.engine.state.RequestState` under the *state id*
the scheduler chose, and the request that resumes the cache starts from it. The messages ride
on the ``SchedulerOutput`` (:data:`~vllm_caote.engine.sessions.SESSIONS_ATTR`).

Invariants:

* a state is kept only when its request leaves the worker (the step's ``finished_req_ids`` or
  ``preempted_req_ids``, before its state is dropped) and it
  describes exactly the kept cache: its last confirmed step ended at the kept ``T`` true tokens
  with ``C`` cache slots, and every attention layer has its state (an H2O sum of ``C`` slots,
  query moments): else nothing is kept under the id;
* a state is given only to the request the scheduler names with its id, in that request's
  first (resetting) plan, and at most once (it leaves the store); an id the worker does not
  hold leaves the request on the policy's fresh state, reported ``"rebuilt"``
  (:data:`~vllm_caote.engine.sessions.REPORT_STATE`), never another request's state;
* the store holds at most what the scheduler indexes (it drops ids with their caches) and at
  most :data:`MAX_STATE_BYTES` of tensors, dropping its oldest entries past that;
* under tensor parallelism every rank keeps its own shard's state the same way: the messages
  are the same on every rank and the checks depend only on them and on state shapes, which are
  the same on every rank.
"""

from __future__ import annotations

from collections import OrderedDict

from vllm_caote.engine.sessions import REPORT_STATE, SESSIONS_ATTR
from vllm_caote.engine.state import RequestState

#: tensor bytes of kept states one worker holds at most (oldest dropped first past it)
MAX_STATE_BYTES = 512 << 20


class KeptStates:
    """One worker's kept states, by state id (oldest first)."""

    def __init__(self, max_bytes: int = MAX_STATE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.store: OrderedDict[int, tuple[RequestState, int]] = OrderedDict()
        self.bytes = 0
        # keep orders for requests whose finish has not reached this worker yet
        self.pending: dict[str, tuple[int, int, int]] = {}

    def finishing(self, ev, scheduler_output) -> None:
        """Before the step's finished (or preempted) requests drop their state: keep those the
        scheduler kept, drop the ids it dropped."""
        msg = getattr(scheduler_output, SESSIONS_ATTR, None) or {}
        self.pending.update(msg.get("keep") or {})
        gone = {*scheduler_output.finished_req_ids, *(scheduler_output.preempted_req_ids or ())}
        for rid in [r for r in self.pending if r in gone]:
            sid, length, cached = self.pending.pop(rid)
            st = ev.requests.get(rid)
            if fits(st, length, cached, ev.num_kv_layers):
                self._add(sid, st)
        dropped = set(msg.get("drop") or ())
        if dropped:
            for sid in dropped & self.store.keys():
                self._pop(sid)
            self.pending = {r: k for r, k in self.pending.items() if k[0] not in dropped}

    def resuming(self, ev, scheduler_output) -> None:
        """After the step's resets: resuming requests start from their kept state, or from the
        policy's fresh one; either way the scheduler is told which."""
        msg = getattr(scheduler_output, SESSIONS_ATTR, None) or {}
        for rid, sid in (msg.get("resume") or {}).items():
            st = self._pop(sid)
            if st is not None:
                ev.requests[rid] = st
            ev.report.setdefault(REPORT_STATE, {})[rid] = "kept" if st is not None else "rebuilt"

    def _add(self, sid: int, st: RequestState) -> None:
        size = state_bytes(st)
        if size > self.max_bytes:
            return
        self.store[sid] = (st, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._pop(next(iter(self.store)))

    def _pop(self, sid: int) -> RequestState | None:
        held = self.store.pop(sid, None)
        if held is None:
            return None
        self.bytes -= held[1]
        return held[0]


def fits(st: RequestState | None, length: int, cached: int, num_layers: int) -> bool:
    """``st`` describes exactly a cache of ``cached`` slots holding ``length`` true tokens."""
    if st is None or st.tokens != length or st.cache != cached:
        return False
    if not st.layers or len(st.layers) != num_layers:
        return False
    for ls in st.layers.values():
        if ls.h2o is None and ls.moments is None:
            return False
        if ls.h2o is not None and ls.h2o.shape[-1] != cached:
            return False
    return True


def state_bytes(st: RequestState) -> int:
    total = 0
    for ls in st.layers.values():
        tensors = [ls.h2o]
        if ls.moments is not None:
            tensors += [ls.moments.shift, ls.moments.total, ls.moments.outer]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total
