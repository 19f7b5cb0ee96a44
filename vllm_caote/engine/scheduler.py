"""Scheduler side of eviction (engine-core process).

:class:`CaoteScheduler` is vLLM's ``Scheduler`` with eviction added (the overrides live in
:class:`EvictionSchedulerMixin`, shared with the async scheduler of
:mod:`vllm_caote.engine.async_scheduler`); the plugin selects one through vLLM's own
``scheduler_config.scheduler_cls`` (:mod:`vllm_caote.configure`). Each owns
:class:`SchedulerEviction`, the single source of truth of every budgeted request: how many of
its tokens are evicted, when it evicts next, which blocks it gives back.

Invariants kept here, for a request with budget ``B``, block size ``bs``, prefill chunk
``chunk`` and decode slack ``slack`` (setting ``eviction_slack`` rounded up to whole blocks, at
least one; ``keep = ceil(B/bs) * bs``):

* once its prompt is processed it holds at most ``(keep + slack) / bs`` blocks, i.e.
  ``ceil(B/bs) + max(1, ceil(eviction_slack/bs))`` (plus any prefix-cache blocks it shares):
  decoding, its cache grows to ``keep + slack`` tokens and is then evicted back to ``keep``,
  one eviction per ``slack`` generated tokens whatever the block size;
* while its prompt is processed, by prefill mode (setting ``prefill``):

  - ``blockwise``: at most ``ceil((keep + chunk)/bs)`` blocks, always (chunks of ``chunk``
    tokens aligned to the prompt's end, so the last one, with the question, is whole; the first
    takes the rest, at most ``keep + chunk``; each followed by an eviction to ``keep``);
  - ``adaptive`` (default): the whole prompt is cached and evicted once at its end, with the
    prompt's end (the question) in the observation window, *only while the pool has free blocks
    for the rest of the prompt beyond what running requests are owed* (their growth to their
    peaks before they next give blocks back: :mod:`vllm_caote.engine.headroom`). Without
    room, a prompt not yet started waits, holding no block, while budgeted prompts in
    whole-prompt prefill will give it the room when they shrink to their budgets (at most
    ``prefill_wait`` seconds); otherwise, or once started, it goes ``blockwise`` for the rest
    of the prompt, so under memory pressure the blockwise bound holds;
  - ``oneshot``: the whole prompt, evicted once at its end (SnapKV's setting; no prefill bound);
* blocks are given back only for evictions the worker *confirmed* (the step's
  :data:`~vllm_caote.engine.plan.REPORT_ATTR`). A planned eviction that was not confirmed
  (a worker that skipped it, or failed in scoring/compaction) leaves the cache in an unknown
  state: the request is recomputed from token 0 without eviction, and its stats say why.
  Nothing else in the batch is touched, and the engine keeps serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_caote.config import BUDGET_KEY, POLICY_KEY, RECENT_KEY, STATS_KEY, settings
from vllm_caote.engine.budget import RequestBudget
from vllm_caote.engine.fallback import Restarts
from vllm_caote.engine.headroom import Headroom
from vllm_caote.engine.kv_cache_manager import adopt
from vllm_caote.engine.plan import PLAN_ATTR, REPORT_ATTR, StepPlan, cdiv
from vllm_caote.engine.preemption import PreemptedCaches
from vllm_caote.engine.sessions import KeptSessions, sessions_enabled
from vllm_caote.engine.support import check_kv_cache_config

logger = logging.getLogger("vllm.vllm_caote.engine")


class SchedulerEviction:
    """Per-engine eviction bookkeeping: decisions, block release, stats."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.settings = settings(scheduler.vllm_config)
        self.block_size = scheduler.cache_config.block_size
        self.requests: dict[str, RequestBudget] = {}
        # Hooks for metrics (vllm_caote.metrics): finished requests' stats.
        self.finished_stats: list[dict] = []
        self.freed_blocks_total = 0
        # requests whose eviction failed: recomputed without it, stats kept until they finish
        self.fallen_back: dict[str, RequestBudget] = {}
        # Prefill: "blockwise" chunks of at most `chunk` tokens, each evicted back to the budget;
        # "oneshot" caches the whole prompt and evicts once with its last queries; "adaptive"
        # is oneshot while the pool has room for it and blockwise otherwise.
        self.chunk = max(self.settings.prefill_chunk, self.block_size)
        self.mode = "oneshot" if self.settings.prefill_chunk == 0 else self.settings.prefill
        # decode: grow to keep + slack, then evict back to keep (whole blocks, at least one)
        self.slack = max(cdiv(self.settings.eviction_slack, self.block_size), 1) * self.block_size
        self.kv = adopt(scheduler.kv_cache_manager, self)
        # finished requests' compacted caches, resumed by the next turn (engine/sessions.py)
        self.sessions = KeptSessions(self, sessions_enabled(scheduler, self.settings))
        # preempted requests' compacted caches, resumed when rescheduled (engine/preemption.py)
        self.kept_preempted = PreemptedCaches(
            self, self.sessions.enabled and bool(self.settings.keep_preempted)
        )
        self.headroom = Headroom(self)  # what a budgeted chunk may take (engine/headroom.py)
        #: Test seam: a request for which it returns True is given 0 tokens this step, so vLLM
        #: leaves it out of the step through its own ``num_new_tokens == 0`` path, as it does
        #: when a token, encoder or DP-balancing budget runs out in front of it.
        self.hold_back: Callable[[object], bool] | None = None
        self.clock: Callable[[], float] = time.monotonic  # the prefill wait's clock (tests)
        #: set by the async scheduler: a planned eviction's tail leaves the request's block
        #: list when planned (:mod:`vllm_caote.engine.async_scheduler`), not in :meth:`release`
        self.detached_at_plan = False

    # -- BlockBudgets (asked by the KV cache coordinator) --------------------------------------

    def is_budgeted(self, request_id: str) -> bool:
        return request_id in self.requests

    def tokens_for_blocks(self, request_id: str, num_tokens: int) -> int:
        """Token count the KV manager must back with blocks: the compacted cache, not history."""
        st = self.requests.get(request_id)
        return num_tokens if st is None else max(num_tokens - st.evicted, 0)

    def admission_tokens(self, request_id: str, num_tokens: int, prefix: int = 0) -> int:
        """Full-sequence admission check: a budgeted request never needs more than its
        ``prefix`` (prefix-cache hits) plus ``keep + max(chunk, slack)`` of its own tokens
        (``chunk`` while its prompt is processed block-wise, ``slack`` while it decodes)."""
        st = self.requests.get(request_id)
        if st is None:
            return num_tokens
        need = max(num_tokens - st.evicted, 0)
        own = st.keep + max(self.chunk, self.slack)
        return need if self.mode == "oneshot" else min(need, prefix + own)

    # -- request lifecycle ---------------------------------------------------------------------

    def add(self, request) -> None:
        """A new request: budgeted if its (validated) ``extra_args`` carry a budget."""
        if request.sampling_params is None or request.request_id in self.requests:
            return  # a streaming-input session update keeps the state it has
        args = request.sampling_params.extra_args or {}
        budget, policy = args.get(BUDGET_KEY), args.get(POLICY_KEY)
        if not budget:
            return
        keep = cdiv(int(budget), self.block_size) * self.block_size
        policy = str(policy or self.settings.default_policy)
        recent = args.get(RECENT_KEY)
        recent = None if recent is None else float(recent)
        self.requests[request.request_id] = RequestBudget(int(budget), keep, policy, recent)

    def cap_chunk(self, request, computed: int, num_new_tokens: int) -> int:
        """The prompt tokens a budgeted request may process this step, ``computed`` tokens
        (prefix-cache hits included) being done (see the module doc)."""
        if self.hold_back is not None and self.hold_back(request):
            return 0
        st = self.requests.get(request.request_id)
        if st is None or self.mode == "oneshot":
            return num_new_tokens
        if computed >= request.num_prompt_tokens:
            return num_new_tokens  # decoding: one token (or a replay after preemption)
        cache = computed - st.evicted
        bs = self.block_size
        # free blocks no running request (or preempted request's kept cache) is owed
        spare, held = self.headroom.spare(request, computed, st)
        cap = self.headroom.cap_blocks(st)
        if self.mode == "adaptive":
            whole = max(cdiv(cache + request.num_prompt_tokens - computed, bs), cap)
            short = whole - held - spare
            if short <= 0:
                st.blockwise, st.waiting_since = False, None
                return num_new_tokens
            if st.fresh and self.headroom.wait_for_headroom(st, short):
                return 0  # vLLM leaves it waiting this step; it holds no block meanwhile
        st.blockwise = True
        # its own tokens never exceed keep + chunk: the first chunk may be keep + chunk tokens
        # (before its first step all computed tokens are hits, or a kept cache it resumes)
        head = st.shared if not st.fresh else (st.resume.shared if st.resume else computed)
        own = cache - head
        room = max(st.keep + self.chunk - own, bs)
        # chunks are aligned to the prompt's end: the last one, which holds the question, is a
        # whole chunk, so its eviction picks from the most text the bound lets the question see;
        # this one takes what is left over (the first: more than keep, at most keep + chunk)
        rest = request.num_prompt_tokens - computed
        aligned = rest - self.chunk * cdiv(rest - room, self.chunk) if rest > room else room
        n = min(num_new_tokens, aligned if aligned > 0 else room)
        # the chunk takes only blocks no one else is owed, and only if the pool also covers its
        # own growth to its cap afterwards: so vLLM never has to preempt to make room for it
        fits = (held + spare) * bs - cache if spare >= cap - held else 0
        if st.fresh:
            return max(min(n, fits), 0)  # 0: not admitted this step; it holds nothing meanwhile
        # started: it holds blocks, so it never stalls (with every running request a budgeted
        # prefill, stalling could wait forever); short of room it reads what its last block
        # holds, or one block, and its eviction after the chunk gives blocks back
        return min(n, max(fits, bs - cache % bs))

    def plan(self, scheduler_output) -> None:
        """Decide, per scheduled budgeted request, whether it evicts after this step."""
        plans: dict[str, StepPlan] = {}
        sched = self.scheduler
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            st = self.requests.get(req_id)
            if st is None:
                continue
            request = sched.requests[req_id]
            computed_before = request.num_computed_tokens - n
            reset = st.fresh
            if reset:  # first step since arrival or preemption: any prefix so far is cache hits
                r, st.resume = st.resume, None  # or a kept compacted cache it resumes
                self.sessions.resuming(req_id, r)  # its workers start from the kept state
                st.fresh, st.evicted = False, (r.evicted if r else 0)
                shared = r.shared if r else computed_before
                st.shared, st.shared_blocks = shared, shared // self.block_size
                st.settled = getattr(r, "settled", r.cached) if r else 0
                self.kept_preempted.started(request, st, computed_before)
            cache_after = computed_before - st.evicted + n
            own = cache_after - st.shared  # the budget bounds the tokens it holds alone
            prefilling = computed_before < request.num_prompt_tokens
            # decoding, the cache grows by `slack` past keep before it evicts back to keep
            threshold = st.keep if prefilling else st.keep + self.slack
            evict_to = st.shared + st.keep if (own > st.keep and own >= threshold) else None
            prompt_done = request.num_computed_tokens >= request.num_prompt_tokens
            if prefilling and not prompt_done and (self.mode == "oneshot" or not st.blockwise):
                evict_to = None  # the whole prompt first: evict with the question in the window
            st.observe(self.kv.num_held_blocks(req_id), cache_after)
            st.tokens_seen = max(st.tokens_seen, request.num_computed_tokens)
            st.evict_in_flight = evict_to is not None
            if evict_to is not None:
                st.settled = evict_to
            plans[req_id] = StepPlan(
                st.evicted, evict_to, st.policy, reset, st.shared, prompt_done=prompt_done,
                generation=st.generation, recent=st.recent,
            )  # fmt: skip
            if evict_to is not None:
                dropped = cache_after - evict_to
                st.evicted += dropped
                st.evicted_total += dropped
                st.events += 1
        for request in sched.running:  # vLLM left these out of the step (budget, balancing)
            st = self.requests.get(request.request_id)
            if st is not None and st.evicted and request.request_id not in plans:
                st.steps_left_out += 1
        setattr(scheduler_output, PLAN_ATTR, plans)
        self.sessions.ship(scheduler_output)

    def release(self, scheduler_output, model_runner_output) -> dict[str, str]:
        """After a step ran: give back the blocks of every *confirmed* compaction.

        Returns ``{request_id: reason}`` for planned evictions the worker did not confirm, and
        for budgeted rows the worker reports failed without one (they missed the hook).
        """
        plans = getattr(scheduler_output, PLAN_ATTR, None) or {}
        report = getattr(model_runner_output, REPORT_ATTR, None) or {}
        self.sessions.state_outcome(report)
        compacted = report.get("compacted", {})
        failed_reasons = report.get("failed", {})
        failed: dict[str, str] = {}
        for req_id, p in plans.items():
            if req_id not in self.requests:
                continue
            if p.evict_to is None:
                # a row that missed the hook (window queries, scoring state): nothing to free,
                # but its next eviction would score on what it never saw
                if req_id in failed_reasons:
                    failed[req_id] = failed_reasons[req_id]
                continue
            if compacted.get(req_id) == p.evict_to:
                if not self.detached_at_plan:  # else the async scheduler's fence frees them
                    self.freed_blocks_total += self.kv.trim(
                        req_id, cdiv(p.evict_to, self.block_size)
                    )
            else:
                failed[req_id] = failed_reasons.get(
                    req_id, "the worker did not confirm the planned compaction"
                )
        return failed

    def failed_last_step(self, failed: dict[str, str]) -> None:
        for req_id, reason in failed.items():
            st = self.requests.get(req_id)
            if st is not None:
                st.error = (
                    f"eviction failed in the request's last step (answer unaffected): {reason}"
                )

    def fall_back(self, request, reason: str) -> bool:
        """Eviction failed mid-way: the request runs without eviction from now on (the caller
        restarts it from token 0: :mod:`vllm_caote.engine.fallback`). False if unbudgeted."""
        st = self.requests.pop(request.request_id, None)
        if st is None:
            return False
        st.error = f"eviction failed, request recomputed without eviction: {reason}"
        # its stats now describe the run that produces its answer: the full cache, nothing
        # claimed as shared (its restart may read prefix-cache hits, unbudgeted)
        st.evicted = st.evicted_total = st.events = 0
        st.peak_blocks = st.peak_tokens = st.own_peak_blocks = st.own_peak_tokens = 0
        st.shared = st.shared_blocks = 0
        st.resume, st.resumed = None, 0
        self.fallen_back[request.request_id] = st
        logger.error("vllm-caote: request %s: %s", request.request_id, st.error)
        return True

    def preempted(self, request) -> None:
        st = self.requests.get(request.request_id)
        if st is not None:
            st.evicted, st.fresh = 0, True
            st.resume, st.resumed = None, 0  # from token 0, unless it resumes its kept cache
            st.generation += 1
            st.preemptions += 1

    def finished(self, request) -> dict | None:
        rid = request.request_id
        self.kept_preempted.forget(rid)  # finished (or aborted) while preempted: nothing to resume
        st = self.requests.pop(rid, None)
        if st is None:
            st = self.fallen_back.pop(rid, None)
            if st is None:
                return None
            # ran on the full cache since its fallback: what it holds at the end is its peak
            st.observe(self.kv.num_held_blocks(rid), request.num_computed_tokens)
        else:
            self.sessions.keep(request, st)  # its blocks stay cached free blocks once freed
        st.tokens_seen = max(st.tokens_seen, request.num_computed_tokens)
        stats = st.stats()
        self.finished_stats.append(stats)
        logger.info(
            "vllm-caote: request %s finished (%s): budget=%d policy=%s tokens_seen=%d "
            "evicted=%d events=%d peak_blocks=%d%s",
            rid,
            request.status,
            st.budget,
            st.policy,
            st.tokens_seen,
            st.evicted_total,
            st.events,
            st.peak_blocks,
            f" error={st.error!r}" if st.error else "",
        )
        return stats


class EvictionSchedulerMixin:
    """Per-request KV eviction on top of a vLLM scheduler class (``Scheduler`` or
    ``AsyncScheduler``): the overrides both plugin schedulers share.

    Two hooks differ between them: :meth:`_caote_settle` (a step's report in: free the blocks
    of confirmed compactions, return the unconfirmed ones) and :meth:`_caote_settled` (after
    vLLM processed the step)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_kv_cache_config(self.kv_cache_config)
        self.caote = SchedulerEviction(self)
        self.caote_restarts = Restarts(self)
        from vllm_caote.metrics.engine import EngineMetrics

        self.caote_metrics = EngineMetrics(self)

    def add_request(self, request) -> None:
        super().add_request(request)
        existing = self.requests.get(request.request_id)
        if existing is request:
            self.caote.add(request)
        elif existing is not None:  # a streaming-input session's next input
            self.caote_restarts.session_updated(existing)

    def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
        n = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        return self.caote.cap_chunk(request, num_computed_tokens, n)

    def schedule(self, *args, **kwargs):
        out = super().schedule(*args, **kwargs)
        self.caote.plan(out)
        return out

    def _caote_settle(self, scheduler_output, model_runner_output) -> dict[str, str]:
        """Step done: trim every confirmed compaction; ``{request_id: reason}`` of the rest."""
        return self.caote.release(scheduler_output, model_runner_output)

    def _caote_settled(self) -> None:
        """After vLLM processed a step's output (the async scheduler frees fenced blocks)."""

    def update_from_output(self, scheduler_output, model_runner_output):
        self.caote_metrics.ingest_output(model_runner_output)
        failed = self._caote_settle(scheduler_output, model_runner_output)
        # The step's own output is valid: each layer attended before it compacted. A request
        # that finishes in this step keeps the failure in its stats; the others fall back.
        self.caote.failed_last_step(failed)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id, reason in failed.items():
            request = self.requests.get(req_id)
            if request is not None and self.caote.fall_back(request, reason):
                self.caote_restarts.restart(request)  # blocks freed, from token 0
        self._caote_settled()
        return outputs

    def _preempt_request(self, request, *args, **kwargs) -> None:
        # first, while it holds its blocks: its cache may be kept (engine/preemption.py)
        self.caote.kept_preempted.keep(request, self.caote.requests.get(request.request_id))
        super()._preempt_request(request, *args, **kwargs)
        self.caote.preempted(request)

    def _free_request(self, request, *args, **kwargs):
        stats = self.caote.finished(request)  # first: it reads the blocks the request holds
        self.caote_restarts.forget(request.request_id)
        result = super()._free_request(request, *args, **kwargs)
        if stats is None:
            return result
        kv_xfer, *rest = result
        kv_xfer = dict(kv_xfer or {})
        kv_xfer[STATS_KEY] = stats
        return (kv_xfer, *rest)

    def make_stats(self, *args, **kwargs):
        stats = super().make_stats(*args, **kwargs)
        self.caote_metrics.publish(stats)
        return stats


class CaoteScheduler(EvictionSchedulerMixin, Scheduler):
    """vLLM's scheduler plus per-request KV eviction (selected via ``scheduler_cls``)."""
