"""Scheduler side of eviction (engine-core process).

Wraps ``vllm.v1.core.sched.scheduler.Scheduler``:

* ``__init__``           attach a :class:`SchedulerEviction`;
* ``_reserve_prefill_lookahead``  (the last cut every prefill chunk size passes through) cap a
                         budgeted request's chunk at ``VLLM_CAOTE_PREFILL_CHUNK`` tokens;
* ``add_request``        read ``kv_budget``/``kv_policy`` from ``SamplingParams.extra_args``;
* ``schedule``           decide, per scheduled budgeted request, whether it evicts after this
                         step, and ship the :class:`~vllm_caote.engine.plan.StepPlan` to workers;
* ``update_from_output`` give the blocks emptied by this step's eviction back to the pool;
* ``_preempt_request``   a preempted request restarts from token 0: nothing is evicted any more;
* ``_free_request``      report per-request eviction stats through ``kv_transfer_params``.

Invariant kept here: a request with budget ``B`` holds at most ``ceil(B/bs) + 1`` blocks while
decoding and ``ceil(B/bs) + ceil(chunk/bs)`` while a prefill chunk is in flight.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from vllm_caote.config import settings
from vllm_caote.engine.plan import PLAN_ATTR, StepPlan, cdiv

logger = logging.getLogger("vllm_caote.engine")

STATS_KEY = "kv_eviction"


@dataclass
class RequestBudget:
    """Eviction state of one request, owned by the scheduler."""

    budget: int  # tokens the user asked for
    keep: int  # budget rounded up to whole blocks: the cache size after every eviction
    policy: str
    evicted: int = 0  # tokens evicted from the current cache (reset on preemption)
    evicted_total: int = 0
    events: int = 0
    peak_blocks: int = 0
    peak_tokens: int = 0
    tokens_seen: int = 0
    free_after_step: int | None = None  # blocks to keep once the in-flight step is done
    started: float = field(default_factory=time.monotonic)

    def stats(self) -> dict:
        return {
            "budget": self.budget,
            "policy": self.policy,
            "evicted_tokens": self.evicted_total,
            "eviction_events": self.events,
            "peak_blocks": self.peak_blocks,
            "peak_tokens": self.peak_tokens,
            "tokens_seen": self.tokens_seen,
        }


class SchedulerEviction:
    """Per-engine eviction bookkeeping: decisions, block release, stats."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.settings = settings()
        self.block_size = scheduler.cache_config.block_size
        self.requests: dict[str, RequestBudget] = {}
        self.enabled = True
        # Hooks for metrics (vllm_caote.metrics): finished requests' stats.
        self.finished_stats: list[dict] = []
        self.freed_blocks_total = 0
        sched_cfg = scheduler.scheduler_config
        if getattr(sched_cfg, "async_scheduling", False):
            # Freed blocks and slot offsets assume the step's output is processed before the
            # next step is scheduled.
            logger.warning(
                "vllm-caote: async scheduling is on; kv_budget is ignored. "
                "Start vLLM with --no-async-scheduling to enable eviction."
            )
            self.enabled = False
        # Block-wise prefill: a budgeted request's prompt goes in chunks of at most this many
        # tokens, so it never holds more than budget + one chunk. None (setting 0): the whole
        # prompt is cached, then evicted once with the prompt's last queries (SnapKV's setting).
        chunk = self.settings.prefill_chunk
        self.chunk: int | None = max(chunk, self.block_size) if chunk > 0 else None
        coordinator = scheduler.kv_cache_manager.coordinator
        coordinator._caote = self

    # -- request lifecycle ---------------------------------------------------------------------

    def add(self, request) -> None:
        if not self.enabled or request.sampling_params is None:
            return
        args = request.sampling_params.extra_args or {}
        budget, policy = args.get("kv_budget"), args.get("kv_policy")
        if not budget:
            return
        keep = cdiv(int(budget), self.block_size) * self.block_size
        self.requests[request.request_id] = RequestBudget(int(budget), keep, str(policy))

    def cap_chunk(self, request, num_new_tokens: int) -> int:
        """Block-wise prefill: at most one chunk of a budgeted request's prompt per step."""
        if (
            self.chunk is not None
            and request.request_id in self.requests
            and num_new_tokens > self.chunk
        ):
            return self.chunk
        return num_new_tokens

    def tokens_for_blocks(self, request_id: str, num_tokens: int) -> int:
        """Token count the KV manager must back with blocks: the compacted cache, not history."""
        st = self.requests.get(request_id)
        if st is None:
            return num_tokens
        return max(num_tokens - st.evicted, 0)

    def admission_tokens(self, request_id: str, num_tokens: int) -> int:
        """Full-sequence admission check: a budgeted request never needs more than this."""
        st = self.requests.get(request_id)
        if st is None:
            return num_tokens
        need = max(num_tokens - st.evicted, 0)
        return need if self.chunk is None else min(need, st.keep + self.chunk)

    # -- per step ------------------------------------------------------------------------------

    def plan(self, scheduler_output) -> None:
        plans: dict[str, StepPlan] = {}
        sched = self.scheduler
        bs = self.block_size
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            st = self.requests.get(req_id)
            if st is None:
                continue
            request = sched.requests[req_id]
            computed_before = request.num_computed_tokens - n
            if computed_before == 0:
                st.evicted = 0  # fresh start or restart after preemption
            cache_after = computed_before - st.evicted + n
            prefilling = computed_before < request.num_prompt_tokens
            threshold = st.keep if prefilling else st.keep + bs
            evict_to = st.keep if (cache_after > st.keep and cache_after >= threshold) else None
            if self.chunk is None and request.num_computed_tokens < request.num_prompt_tokens:
                evict_to = None  # one-shot prefill eviction: wait for the whole prompt
            blocks = self._held_blocks(req_id)
            st.peak_blocks = max(st.peak_blocks, blocks)
            st.peak_tokens = max(st.peak_tokens, cache_after)
            st.tokens_seen = max(st.tokens_seen, request.num_computed_tokens)
            plans[req_id] = StepPlan(st.evicted, evict_to, st.policy, computed_before == 0)
            if evict_to is not None:
                dropped = cache_after - evict_to
                st.evicted += dropped
                st.evicted_total += dropped
                st.events += 1
                st.free_after_step = cdiv(evict_to, bs)
        setattr(scheduler_output, PLAN_ATTR, plans)

    def release(self, scheduler_output) -> None:
        """After a step ran: return the blocks its compaction emptied to the pool."""
        plans = getattr(scheduler_output, PLAN_ATTR, None) or {}
        for req_id, p in plans.items():
            st = self.requests.get(req_id)
            if p.evict_to is None or st is None or st.free_after_step is None:
                continue
            self._trim(req_id, st.free_after_step)
            st.free_after_step = None

    def preempted(self, request) -> None:
        st = self.requests.get(request.request_id)
        if st is not None:
            st.evicted = 0
            st.free_after_step = None

    def finished(self, request) -> dict | None:
        st = self.requests.pop(request.request_id, None)
        if st is None:
            return None
        stats = st.stats()
        self.finished_stats.append(stats)
        return stats

    # -- block pool access ---------------------------------------------------------------------

    def _managers(self):
        return self.scheduler.kv_cache_manager.coordinator.single_type_managers

    def _held_blocks(self, req_id: str) -> int:
        return max((len(m.req_to_blocks.get(req_id, ())) for m in self._managers()), default=0)

    def _trim(self, req_id: str, keep_blocks: int) -> None:
        pool = self.scheduler.kv_cache_manager.block_pool
        for m in self._managers():
            blocks = m.req_to_blocks.get(req_id)
            if not blocks or len(blocks) <= keep_blocks:
                continue
            tail = blocks[keep_blocks:]
            del blocks[keep_blocks:]
            if req_id in m.num_cached_block:
                m.num_cached_block[req_id] = min(m.num_cached_block[req_id], keep_blocks)
            pool.free_blocks(reversed(tail))
            self.freed_blocks_total += len(tail)


def install() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    if getattr(Scheduler, "_caote_patched", False):
        return
    Scheduler._caote_patched = True

    orig_init = Scheduler.__init__
    orig_add = Scheduler.add_request
    orig_schedule = Scheduler.schedule
    orig_update = Scheduler.update_from_output
    orig_preempt = Scheduler._preempt_request
    orig_free = Scheduler._free_request
    orig_lookahead = Scheduler._reserve_prefill_lookahead

    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        self.caote = SchedulerEviction(self)

    def add_request(self, request):
        orig_add(self, request)
        if request.request_id in self.requests:
            self.caote.add(request)

    def schedule(self, *args, **kwargs):
        out = orig_schedule(self, *args, **kwargs)
        self.caote.plan(out)
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        self.caote.release(scheduler_output)
        return orig_update(self, scheduler_output, model_runner_output)

    def _preempt_request(self, request, *args, **kwargs):
        orig_preempt(self, request, *args, **kwargs)
        self.caote.preempted(request)

    def _free_request(self, request, *args, **kwargs):
        result = orig_free(self, request, *args, **kwargs)
        stats = self.caote.finished(request)
        if stats is None:
            return result
        kv_xfer, *rest = result
        kv_xfer = dict(kv_xfer or {})
        kv_xfer[STATS_KEY] = stats
        return (kv_xfer, *rest)

    def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
        n = orig_lookahead(self, request, num_computed_tokens, num_new_tokens)
        return self.caote.cap_chunk(request, n)

    Scheduler.__init__ = __init__
    Scheduler._reserve_prefill_lookahead = _reserve_prefill_lookahead
    Scheduler.add_request = add_request
    Scheduler.schedule = schedule
    Scheduler.update_from_output = update_from_output
    Scheduler._preempt_request = _preempt_request
    Scheduler._free_request = _free_request

    from vllm_caote.metrics.engine import install_scheduler  # vllm_caote:* metrics payload

    install_scheduler(Scheduler)
