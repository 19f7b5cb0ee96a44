"""A failed eviction never leaves a half-compacted cache alive (engine-core process).

A planned compaction the worker did not confirm (or a budgeted row that missed the hook) leaves
the request's cache in an unknown state: some layers compacted, others not. The scheduler drops
the request's budget (:meth:`SchedulerEviction.fall_back`), then :class:`Restarts` restarts it,
whatever its status, so that invariant holds:

* **every live request whose compaction failed gets its blocks freed and restarts from token 0**,
  without eviction:

  - running: vLLM's own preemption, with ``drop_stale_output=True`` (under async scheduling the
    step scheduled since ran on the unconfirmed cache);
  - alive but not running: a streaming-input (resumable) session whose turn ended in the
    failing step; vLLM put it back in its waiting queues holding its blocks
    (``Scheduler._handle_stopped_request``). Its blocks are freed at once (after the step in
    flight, as vLLM frees them), the worker is told to drop its eviction state (the step's
    ``preempted_req_ids``) and its computed count goes to 0 in the plain waiting queue. A
    session still waiting for its next input keeps the count until that input arrives (vLLM's
    session update reads it to keep the turn's output tokens), then restarts the same way; it
    holds no block meanwhile;

* **a request's blocks stay unregistered until they are freed**: the prefix cache never holds a
  block computed under a budget (the coordinator's ``cache_blocks`` is a no-op while budgeted),
  and the budget is dropped only in the step its blocks are freed or cut from it.
"""

from __future__ import annotations

import time

from vllm.v1.request import RequestStatus


class Restarts:
    """Restarts of fallen-back requests, for one scheduler (see the module doc)."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        #: sessions waiting for their next input whose computed count resets when it arrives
        self.pending: set[str] = set()

    def restart(self, request) -> None:
        """Free every block of ``request`` (alive, its budget just dropped) and restart it from
        token 0."""
        sched = self.scheduler
        if request.status == RequestStatus.RUNNING:
            sched.running.remove(request)
            # a step scheduled since (async) ran on the unconfirmed cache: drop its output.
            # Synchronous: nothing is in flight here, so the flag changes nothing.
            sched._preempt_request(request, time.monotonic(), drop_stale_output=True)
            return
        # Alive but not running: a streaming-input session whose turn ended in this step
        # (a preempted one holds nothing and restarts from 0 already)
        sched._free_request_blocks(request)  # deferred past a step in flight, as vLLM's own
        sched.encoder_cache_manager.free(request)
        sched.reset_preempted_req_ids.add(request.request_id)  # the worker drops its state
        if request.status == RequestStatus.WAITING_FOR_STREAMING_REQ:
            self.pending.add(request.request_id)
        else:
            self._from_zero(request)

    def session_updated(self, request) -> None:
        """vLLM applied (or queued) a streaming-input session's next input."""
        if request.request_id not in self.pending:
            return
        if request.status == RequestStatus.WAITING_FOR_STREAMING_REQ:
            return  # still waiting: the update was queued, not applied
        self.pending.discard(request.request_id)
        if not request.is_finished():
            self._from_zero(request)

    def forget(self, request_id: str) -> None:
        self.pending.discard(request_id)

    def _from_zero(self, request) -> None:
        """Holding no block, ``request`` is recomputed from token 0 (prefix-cache hits aside):
        a waiting request with no computed token belongs in vLLM's plain waiting queue."""
        sched = self.scheduler
        request.num_computed_tokens = 0
        if any(r is request for r in sched.kv_holding_waiting):
            sched.kv_holding_waiting.remove_requests([request])
            sched.waiting.add_request(request)
