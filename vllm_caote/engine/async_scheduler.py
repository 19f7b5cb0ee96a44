"""Eviction under vLLM's async scheduling (engine-core process).

With async scheduling vLLM schedules step N+1 before it has seen step N's output
(``EngineCore.step_with_batch_queue``). :class:`CaoteAsyncScheduler` is vLLM's
``AsyncScheduler`` with the eviction of :class:`~vllm_caote.engine.scheduler.CaoteScheduler`
(the shared :class:`~vllm_caote.engine.scheduler.EvictionSchedulerMixin`); the plugin selects it
when ``scheduler_config.async_scheduling`` is on (:mod:`vllm_caote.configure`).

Invariants, for a budgeted request whose step N plans ``evict_to`` (``bs``: block size):

* its list in the KV cache manager is cut to ``ceil(evict_to / bs)`` blocks when N is planned,
  so step N+1, scheduled before N's output is seen, is sized and allocated on the compacted
  cache, as the worker's own records are once N ran (``WorkerEviction.finish_step``);
* the cut tail is held by a :class:`TailFence`, never in the free queue, until every step that
  may write it is done: step N (it writes its new tokens there, then compacts out of it) when
  the worker confirms the compaction; otherwise (failed, or no report) also every step
  scheduled since, since the worker kept the tail in its row;
* the blocks of preempted and finished requests wait the same way: vLLM's own deferred frees
  (``defer_block_free``), on the same step counters (``sched_step_seq``/``processed_step_seq``);
* an unconfirmed compaction makes the request fall back, preempted with
  ``drop_stale_output=True``: the output of the steps scheduled on the unconfirmed cache is
  dropped, and the request is recomputed from token 0 without eviction;
* a plan, and a report entry, carries the request's generation (``StepPlan.generation``,
  bumped on preemption); one of an older generation confirms nothing and fails nothing: the
  request restarted since, from token 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.core.sched.async_scheduler import AsyncScheduler

from vllm_caote.engine.plan import PLAN_ATTR, REPORT_ATTR, REPORT_GENERATION, cdiv
from vllm_caote.engine.scheduler import EvictionSchedulerMixin


@dataclass
class _Held:
    fence: int  # the step (``sched_step_seq``) that must be processed before the blocks go back
    req_id: str
    blocks: list


class TailFence:
    """Tail blocks cut from budgeted requests, each held until its fence step is processed."""

    def __init__(self) -> None:
        self.held: list[_Held] = []

    def hold(self, fence: int, req_id: str, blocks: list) -> None:
        if blocks:
            self.held.append(_Held(fence, req_id, blocks))

    def count(self, req_id: str, fence: int) -> int:
        return sum(len(h.blocks) for h in self.held if h.req_id == req_id and h.fence == fence)

    def extend(self, req_id: str, fence: int) -> None:
        """Hold every tail of ``req_id`` until step ``fence`` too."""
        for h in self.held:
            if h.req_id == req_id:
                h.fence = max(h.fence, fence)

    def due(self, processed: int) -> list[list]:
        """Remove and return the tails whose fence step is processed."""
        out = [h.blocks for h in self.held if h.fence <= processed]
        self.held = [h for h in self.held if h.fence > processed]
        return out

    def block_ids(self) -> set[int]:
        return {b.block_id for h in self.held for b in h.blocks}


class CaoteAsyncScheduler(EvictionSchedulerMixin, AsyncScheduler):
    """vLLM's async scheduler plus per-request KV eviction (see the module doc)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # vLLM's fence for the blocks of preempted and finished requests: a step in flight may
        # still write them (a request that falls back ran its next step on its uncut row)
        self.defer_block_free = True
        self.caote.detached_at_plan = True
        self.caote_fence = TailFence()

    def schedule(self, *args, **kwargs):
        out = super().schedule(*args, **kwargs)  # vLLM's schedule, then the eviction plan
        bs = self.caote.block_size
        for req_id, p in (getattr(out, PLAN_ATTR, None) or {}).items():
            if p.evict_to is not None:
                tail = self.caote.kv.detach(req_id, cdiv(p.evict_to, bs))
                self.caote_fence.hold(self.sched_step_seq, req_id, tail)
        return out

    def _caote_settle(self, scheduler_output, model_runner_output) -> dict[str, str]:
        plans = getattr(scheduler_output, PLAN_ATTR, None) or {}
        report = getattr(model_runner_output, REPORT_ATTR, None)
        if report:  # entries answering a plan of another generation confirm and fail nothing
            gens = report.get(REPORT_GENERATION) or {}

            def answers(rid: str) -> bool:
                p = plans.get(rid)
                return p is not None and gens.get(rid, p.generation) == p.generation

            report = dict(report) | {
                k: {rid: v for rid, v in (report.get(k) or {}).items() if answers(rid)}
                for k in ("compacted", "failed")
            }
            setattr(model_runner_output, REPORT_ATTR, report)
        compacted = (report or {}).get("compacted", {})
        step = self.processed_step_seq + 1  # this step's seq: outputs come back in order
        for rid, p in plans.items():
            if p.evict_to is None:
                continue
            if compacted.get(rid) == p.evict_to:
                self.caote.freed_blocks_total += self.caote_fence.count(rid, step)
            else:  # the worker kept the tail in its row: steps scheduled since may write it
                self.caote_fence.extend(rid, self.sched_step_seq)
        failed = self.caote.release(scheduler_output, model_runner_output)
        return {rid: why for rid, why in failed.items() if self._current(rid, plans[rid])}

    def _current(self, req_id: str, plan) -> bool:
        st = self.caote.requests.get(req_id)
        return st is not None and st.generation == plan.generation

    def _caote_settled(self) -> None:
        pool = self.kv_cache_manager.block_pool
        for blocks in self.caote_fence.due(self.processed_step_seq):
            pool.free_blocks(reversed(blocks))  # tail first, as vLLM frees

    def reset_prefix_cache(self, reset_running_requests: bool = False, *args, **kwargs) -> bool:
        """Preempting every running request to reset the prefix cache needs every block free
        at once; what the fences hold goes back now, as in stock async vLLM (no deferred
        frees): a step in flight runs before any step scheduled later, which could reuse it."""
        if not reset_running_requests:
            return super().reset_prefix_cache(reset_running_requests, *args, **kwargs)
        pool = self.kv_cache_manager.block_pool
        for blocks in self.caote_fence.due(self.sched_step_seq):
            pool.free_blocks(reversed(blocks))
        while self.deferred_frees:
            pool.free_blocks(reversed(self.deferred_frees.popleft()[1]))
        self.defer_block_free = False  # the preemptions inside free at once too
        try:
            return super().reset_prefix_cache(reset_running_requests, *args, **kwargs)
        finally:
            self.defer_block_free = True
