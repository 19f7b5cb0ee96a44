"""Engine-core and worker side of the ``vllm_caote:*`` metrics (see :mod:`vllm_caote.metrics`).

Called from the plugin's own classes, so it runs in every vLLM process the plugin runs in:

* workers: ``CaoteModelRunnerMixin.execute_model`` / ``sample_tokens`` call
  :func:`collect_worker_timings` and :func:`attach_worker_timings`;
* engine core: ``CaoteScheduler`` owns an :class:`EngineMetrics` (``update_from_output`` ->
  :meth:`EngineMetrics.ingest_output`, ``make_stats`` -> :meth:`EngineMetrics.publish`);
* front-end: :class:`~vllm_caote.metrics.logger.CaoteStatLogger` takes the payload out of
  ``SchedulerStats.kv_connector_stats`` (:func:`take_payload`). vLLM's ``StatLoggerManager``
  calls plugin loggers before its own logging and Prometheus loggers, so those never see it.

Nothing here imports prometheus_client: the front-end exporter is :mod:`.logger`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from vllm_caote.metrics import OUTPUT_ATTR, PAYLOAD_KEY

logger = logging.getLogger("vllm.vllm_caote.metrics")

#: attribute a front-end ``SchedulerStats`` gets once its payload is taken out of
#: ``kv_connector_stats`` (decoded objects are plain dataclasses: attributes stick)
STATS_ATTR = "_vllm_caote_metrics"
#: worker timings not yet handed to an output are capped (pipeline-parallel ranks that never
#: return outputs would otherwise grow it forever)
MAX_PENDING = 4096
PAYLOAD_VERSION = 1


def compression_ratio(stats: dict) -> float | None:
    """Tokens seen / tokens kept of a finished budgeted request (``RequestBudget.stats()``).

    Tokens kept is the request's cache at the end: ``tokens_seen - evicted_tokens``. After a
    preemption the request is recomputed from token 0 and evicts again, so ``evicted_tokens``
    counts some tokens twice; the cache is then known to hold at least ``min(seen, budget)``.
    """
    seen = int(stats.get("tokens_seen") or 0)
    if seen <= 0:
        return None
    evicted = int(stats.get("evicted_tokens") or 0)
    budget = int(stats.get("budget") or 0)
    kept = max(seen - evicted, min(seen, budget) if budget > 0 else 1, 1)
    return seen / kept


def split_timings(durations: list[float], policies: list[str]) -> list[list]:
    """Per-(layer, request) durations of one step -> ``[[policy, seconds], ...]`` per request.

    The attention backend appends one duration per layer for each evicting request, in the
    same request order at every layer, so request ``i`` of ``k`` owns ``durations[i::k]``. If
    the counts disagree (a layer skipped a request), the step's total is split evenly.
    """
    if not durations:
        return []
    k = len(policies)
    if k == 0:
        return [["unknown", float(sum(durations))]]
    if len(durations) % k == 0:
        return [[p, float(sum(durations[i::k]))] for i, p in enumerate(policies)]
    share = float(sum(durations)) / k
    return [[p, share] for p in policies]


# -- worker processes --------------------------------------------------------------------------


def collect_worker_timings(runner, scheduler_output) -> None:
    """After a forward pass: the eviction timings, per evicting request, of this step (and on
    CUDA of earlier steps whose work had not completed at their own call)."""
    ev = runner.__dict__.get("_caote")
    if ev is None:
        return
    from vllm_caote.engine.plan import PLAN_ATTR

    plans = getattr(scheduler_output, PLAN_ATTR, None) or {}
    ev.timer.close_step([p.policy for p in plans.values() if p.evict_to is not None])
    # on CUDA, a step whose work is still running is read at a later call (never waited for)
    done = ev.timer.ready()
    if not done:
        return
    pending = runner.__dict__.setdefault("_caote_metrics_pending", [])
    for policies, durations in done:
        pending.extend(split_timings(durations, policies))
    if len(pending) > MAX_PENDING:
        del pending[: len(pending) - MAX_PENDING]


def attach_worker_timings(runner, output) -> None:
    """Hand pending timings to the engine core on a real (not shared) output: a plain one, or
    the one an async output (async scheduling on a GPU) holds for the scheduler."""
    pending = runner.__dict__.get("_caote_metrics_pending")
    if not pending or output is None:
        return
    from vllm.v1.outputs import (
        EMPTY_MODEL_RUNNER_OUTPUT,
        AsyncModelRunnerOutput,
        ModelRunnerOutput,
    )

    if isinstance(output, AsyncModelRunnerOutput):
        output = getattr(output, "_model_runner_output", None)
    if output is EMPTY_MODEL_RUNNER_OUTPUT or not isinstance(output, ModelRunnerOutput):
        return  # keep them for the next step's output
    setattr(output, OUTPUT_ATTR, list(pending))
    pending.clear()


# -- engine core -------------------------------------------------------------------------------


class EngineMetrics:
    """Per-scheduler bookkeeping: what the front-end has been sent, what is new since."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        ev = getattr(scheduler, "caote", None)
        default = getattr(getattr(ev, "settings", None), "default_policy", None)
        self.policies: set[str] = {default} if default else set()
        # cumulative per policy over finished requests (folded in from finished_stats)
        self.finished_evicted: dict[str, int] = defaultdict(int)
        self.finished_events: dict[str, int] = defaultdict(int)
        # cumulative values already shipped
        self.sent_evicted: dict[str, int] = defaultdict(int)
        self.sent_events: dict[str, int] = defaultdict(int)
        self.sent_freed = 0
        self.ratios: list[list] = []  # [[policy, ratio], ...] not shipped yet
        self.prefix_cached: dict[str, int] = defaultdict(int)  # finished requests, not shipped
        self.recomputed: dict[str, int] = defaultdict(int)  # after preemptions, not shipped
        self.timings: list[list] = []  # [[policy, seconds], ...] not shipped yet

    def ingest_output(self, model_runner_output) -> None:
        """``update_from_output``: the worker's eviction timings of the step."""
        timings = getattr(model_runner_output, OUTPUT_ATTR, None)
        if timings:
            self.timings.extend(timings)
            del self.timings[:-MAX_PENDING]

    def _drain_finished(self, ev) -> None:
        finished = list(ev.finished_stats)
        del ev.finished_stats[:]
        for st in finished:
            policy = str(st.get("policy"))
            self.policies.add(policy)
            self.finished_evicted[policy] += int(st.get("evicted_tokens") or 0)
            self.finished_events[policy] += int(st.get("eviction_events") or 0)
            self.prefix_cached[policy] += int(st.get("prefix_cached_tokens") or 0)
            self.recomputed[policy] += int(st.get("recomputed_tokens") or 0)
            ratio = compression_ratio(st)
            if ratio is not None:
                self.ratios.append([policy, ratio])
        del self.ratios[:-MAX_PENDING]

    def publish(self, stats) -> None:
        """``make_stats``: add the payload to the step's ``SchedulerStats`` (None: stats off)."""
        try:
            if stats is None:
                self.discard()
            else:
                attach_payload(stats, self.payload())
        except Exception:  # metrics must never break a step
            logger.exception("vllm-caote metrics: building the stats payload failed")

    def discard(self) -> None:
        """No stats consumer (``log_stats`` off): only keep the engine's lists from growing."""
        ev = getattr(self.scheduler, "caote", None)
        if ev is not None and ev.finished_stats:
            del ev.finished_stats[:]
        self.timings.clear()
        self.ratios.clear()

    def payload(self) -> dict[str, Any]:
        """Everything new since the previous call (deltas) plus current gauges."""
        sched = self.scheduler
        ev = getattr(sched, "caote", None)
        live = ev.requests if ev is not None else {}
        if ev is not None:
            self._drain_finished(ev)

        evicted = defaultdict(int, self.finished_evicted)
        events = defaultdict(int, self.finished_events)
        running_ids = {r.request_id for r in sched.running}
        running: dict[str, int] = defaultdict(int)
        budgeted_blocks = 0
        for rid, st in live.items():
            self.policies.add(st.policy)
            evicted[st.policy] += st.evicted_total
            events[st.policy] += st.events
            if rid in running_ids:
                running[st.policy] += 1
            budgeted_blocks += sched.kv_cache_manager.num_held_blocks(rid)

        d_evicted, d_events = {}, {}
        for p in self.policies:
            d_evicted[p] = max(evicted[p] - self.sent_evicted[p], 0)
            d_events[p] = max(events[p] - self.sent_events[p], 0)
            self.sent_evicted[p] = max(evicted[p], self.sent_evicted[p])
            self.sent_events[p] = max(events[p], self.sent_events[p])
        freed = ev.freed_blocks_total if ev is not None else 0
        d_freed = max(freed - self.sent_freed, 0)
        self.sent_freed = max(freed, self.sent_freed)

        pool = sched.kv_cache_manager.block_pool
        total = max(pool.num_gpu_blocks - 1, 0)  # the null block is never usable (as vLLM)
        used = max(total - pool.get_num_free_blocks(), 0)
        budgeted_blocks = min(budgeted_blocks, used)
        timings, self.timings = self.timings, []
        ratios, self.ratios = self.ratios, []
        prefix_cached, self.prefix_cached = dict(self.prefix_cached), defaultdict(int)
        recomputed, self.recomputed = dict(self.recomputed), defaultdict(int)
        sessions = getattr(ev, "sessions", None)
        resumed: dict[str, int] = {}
        if sessions is not None:
            resumed, sessions.resumed_tokens = dict(sessions.resumed_tokens), {}
        return {
            "v": PAYLOAD_VERSION,
            "policies": sorted(self.policies),
            "blocks_total": total,
            "blocks_used": used,
            "blocks_budgeted": budgeted_blocks,
            "blocks_unbudgeted": used - budgeted_blocks,
            "running": {p: running.get(p, 0) for p in sorted(self.policies)},
            "evicted_tokens": d_evicted,
            "eviction_events": d_events,
            "blocks_freed": d_freed,
            "eviction_seconds": timings,
            "compression_ratio": ratios,
            "prefix_cached_tokens": prefix_cached,
            "resumed_tokens": resumed,
            "recomputed_tokens": recomputed,
            "session_blocks": sessions.num_blocks(max_age=1.0) if sessions is not None else 0,
        }


def attach_payload(stats, payload: dict[str, Any]) -> None:
    """Put ``payload`` into ``stats.kv_connector_stats`` next to a connector's own stats."""
    merged = dict(stats.kv_connector_stats or {})
    merged[PAYLOAD_KEY] = payload
    stats.kv_connector_stats = merged


def take_payload(stats) -> dict[str, Any] | None:
    """Front-end: our payload from a received ``SchedulerStats`` (removing it from the
    connector field, which goes back to ``None`` if nothing else was in it)."""
    if stats is None:
        return None
    payload = getattr(stats, STATS_ATTR, None)
    if payload is not None:
        return payload
    kvs = getattr(stats, "kv_connector_stats", None)
    if not isinstance(kvs, dict) or PAYLOAD_KEY not in kvs:
        return None
    payload = kvs.pop(PAYLOAD_KEY)
    if not kvs:
        stats.kv_connector_stats = None
    try:
        setattr(stats, STATS_ATTR, payload)
    except AttributeError:  # a slotted stats class: the caller keeps the value
        pass
    return payload
