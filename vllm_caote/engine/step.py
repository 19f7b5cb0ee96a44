"""The worker side of one eviction step, in the order it runs.

1. **plan**      ``update_states``: the scheduler's :class:`~vllm_caote.engine.plan.StepPlan`
                 per budgeted request arrives on the ``SchedulerOutput``;
2. **inputs**    ``prepare_inputs``: positions stay the true token indices (RoPE), while cache
                 slots and ``seq_lens`` count the compacted cache (``slot = position - offset``);
                 what the eviction reads on the device reaches it in one copy, which nothing
                 waits for (:mod:`.staging`);
3. **layers**    :func:`after_attention`, called by the attention backend after the stock kernel
                 of every layer: record the window queries, and for a planned eviction score
                 the cache and compact the kept tokens into the request's first slots;
4. **confirm**   ``finish_step``: a compaction counts only if it ran in every layer *on every
                 tensor-parallel rank*; then the worker's own records of the request's blocks
                 (the persistent batch's row *and* the runner's ``CachedRequestState``, from
                 which vLLM rebuilds the row when the request skips a step) shrink with it;
5. **report**    ``attach_report``: the handshake rides to the scheduler on the step's
                 ``ModelRunnerOutput``; the scheduler frees blocks only for what it lists.

Invariant: after every step, the worker's block list of a budgeted request equals the KV
cache manager's (``tests/engine/test_engine_schedules.py`` checks it across skipped steps).

Nothing on the step path reads a device value back to the host (no ``.item()``, ``.tolist()``
or ``.any()`` of a device tensor, no blocking copy): timings are CUDA events read after the
work completed, and a tensor-parallel failure shows in the step's agreement, not in a NaN check.
A failure in a layer fails the rows that needed what failed, never the step or the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_caote.config import settings
from vllm_caote.engine import compaction, evict, graphs
from vllm_caote.engine.kept_state import KeptStates
from vllm_caote.engine.plan import PLAN_ATTR, REPORT_ATTR, StepPlan, cdiv
from vllm_caote.engine.queries import QueryRings, layer_queries, records
from vllm_caote.engine.ranks import Ranks, _HeadSum
from vllm_caote.engine.rope import ModelRope
from vllm_caote.engine.staging import EvictionTimer, upload
from vllm_caote.engine.state import (
    RequestState,
    advance_h2o,
    advance_moments,
)
from vllm_caote.scoring import get_policy
from vllm_caote.scoring.registry import Policy

logger = logging.getLogger("vllm.vllm_caote.engine")


@dataclass
class RowWork:
    """One budgeted request in the running batch."""

    req_id: str
    row: int
    q_start: int
    q_end: int
    cache_len: int  # tokens in this request's cache after the step's KV write
    seen_before: int  # true token count before this step
    block_ids: torch.Tensor  # [ceil(cache_len / bs)] long, on the cache's device
    plan: StepPlan
    policy: Policy
    layers_compacted: int = 0
    error: str | None = None  # set by the first layer that failed; later layers skip the row
    scorer: Policy | None = None  # what scores this step's eviction (None: ``policy``)
    index: dict = field(default_factory=dict)  # compaction.TokenIndex per cache shape (evict.py)

    def __post_init__(self) -> None:
        if self.scorer is None:
            self.scorer = self.policy


@dataclass
class StepContext:
    num_tokens: int
    rows: list[RowWork]
    layers_seen: int = 0  # attention layers that ran the eviction hook on this batch

    def __post_init__(self) -> None:
        # rows with work in every layer beyond recording queries: an eviction, H2O's sum, or
        # Expected Attention's query moments
        self.per_layer = [
            w
            for w in self.rows
            if w.plan.evict_to is not None or w.policy.stateful or w.policy.tracks_queries
        ]
        # rows the step is wrong for unless the hook runs in every layer: the above, and rows
        # that record window queries. A KeyDiff / StreamingLLM row between its compactions is
        # not one: its scores read only the cache, so it may ride a FULL CUDA graph.
        # (H2O and Expected Attention need queries too; membership tests on RowWork would
        # compare dataclass fields, tensors included)
        self.hooked = [
            w for w in self.rows if w.plan.evict_to is not None or w.policy.needs_queries
        ]

    @property
    def needs_hook(self) -> bool:
        """The step must run the attention hook (no FULL CUDA graph: engine/graphs.py)."""
        return bool(self.hooked)


class WorkerEviction:
    """Per model-runner eviction state."""

    def __init__(self, runner, ranks: Ranks | None = None) -> None:
        self.runner = runner
        self.settings = settings(runner.vllm_config)
        self.ranks = ranks if ranks is not None else Ranks.of_tensor_parallel()
        self.requests: dict[str, RequestState] = {}
        self.kept = KeptStates()  # finished requests' states kept with their caches
        # a ring slot per request the batch can hold (the scheduler's max_num_seqs)
        self.rings = QueryRings(self.settings.window, runner.device, runner.max_num_reqs)
        self.rope = ModelRope(runner)
        self.plans: dict[str, StepPlan] = {}
        self.step: StepContext | None = None
        self.num_kv_layers = 0  # attention layers with a KV cache (set at KV-cache init)
        self.kv_cache_dtype = str(runner.cache_config.cache_dtype)
        # Report for the next ModelRunnerOutput: {"compacted": {...}, "failed": {...}}.
        self.report: dict[str, dict] = {"compacted": {}, "failed": {}}
        # Time spent scoring + compacting, drained by the metrics hook.
        self.timer = EvictionTimer(runner.device)
        self.step_policies: list[str] = []
        #: Fault-injection seam (tests): requests for which it returns True skip compaction,
        #: as a worker that cannot compact would. The scheduler must then not free blocks.
        self.skip_compaction: Callable[[str], bool] | None = None

    def drop(self, req_id: str) -> None:
        """Release a request's worker state (query ring slot, H2O sums, query moments)."""
        self.requests.pop(req_id, None)
        self.rings.release(req_id)

    def needs_hook(self) -> bool:
        """The step being run has a budgeted row that needs the attention hook in every layer
        (asked by the CUDA-graph dispatcher, after :meth:`prepare_inputs`)."""
        return self.step is not None and self.step.needs_hook

    def request(self, req_id: str) -> RequestState:
        st = self.requests.get(req_id)
        if st is None:
            st = self.requests[req_id] = RequestState()
        return st

    # 1. plan ------------------------------------------------------------------------------
    def update_states(self, scheduler_output) -> None:
        # a preempted request restarts from scratch (its plan resets): its slot is free now, so
        # the rings never need more slots than there are running requests
        self.kept.finishing(self, scheduler_output)  # states kept with their caches
        gone = (*scheduler_output.finished_req_ids, *(scheduler_output.preempted_req_ids or ()))
        for rid in gone:
            self.requests.pop(rid, None)
            self.rings.release(rid)
        self.plans = getattr(scheduler_output, PLAN_ATTR, None) or {}
        for rid, p in self.plans.items():
            if p.reset:
                self.drop(rid)
        self.kept.resuming(self, scheduler_output)  # resumed requests start from kept states

    # 2. inputs ----------------------------------------------------------------------------
    def prepare_inputs(self, num_scheduled_tokens: np.ndarray) -> None:
        self.step = None
        if not self.plans:
            self.rings.use(None, None)
            return
        r = self.runner
        ib = r.input_batch
        num_reqs = ib.num_reqs
        total = int(num_scheduled_tokens[:num_reqs].sum())
        offsets = np.zeros(num_reqs, dtype=np.int64)
        qsl = r.query_start_loc.np
        bt0 = ib.block_table.block_tables[0]
        rows: list[RowWork] = []
        host_blocks: list[np.ndarray] = []
        for rid, plan in self.plans.items():
            row = ib.req_id_to_index.get(rid)
            if row is None or row >= num_reqs:
                continue
            offsets[row] = plan.offset
            n = int(num_scheduled_tokens[row])
            computed = int(ib.num_computed_tokens_cpu[row])
            cache_len = computed - plan.offset + n
            host_blocks.append(bt0.block_table.np[row, : cdiv(cache_len, bt0.block_size)])
            policy = get_policy(plan.policy)
            rows.append(
                RowWork(
                    rid, row, int(qsl[row]), int(qsl[row + 1]), cache_len, computed,
                    None, plan, policy,  # block_ids: set below, from the step's one copy
                    scorer=scorer_for(policy, plan, self.settings.prefill_base),
                )
            )  # fmt: skip
        src, dst, unslotted = self.rings.plan_step(
            (w.req_id, w.q_start, w.q_end, w.seen_before) for w in rows if records(w.policy)
        )
        # one host-to-device copy (pinned, non-blocking on CUDA) of all the step's inputs
        off, src, dst, *blocks = upload([offsets, src, dst, *host_blocks], r.device)
        self.rings.use(src, dst)
        for work, ids in zip(rows, blocks, strict=True):
            work.block_ids = ids
            if work.req_id in unslotted:
                work.error = "no free query-ring slot"
        if offsets.any():
            r.seq_lens[:num_reqs] -= off.to(r.seq_lens.dtype)
            req_idx = r.req_indices.gpu[:total].long()
            slots_pos = r.positions[:total] - off[req_idx].to(r.positions.dtype)
            ib.block_table.compute_slot_mapping(
                num_reqs, r.query_start_loc.gpu[: num_reqs + 1], slots_pos
            )
        self.step = StepContext(total, rows) if rows else None

    # 4. confirm ---------------------------------------------------------------------------
    def finish_step(self) -> None:
        """Confirm the compactions done in every layer on every rank; the worker's records of
        each confirmed request's blocks shrink with it."""
        step, self.step = self.step, None
        if step is None:
            return
        # every row that needed the hook: a compaction, state or window queries missed in some
        # layer (CUDA graph replay, micro-batching, an unwrapped backend) leaves it wrong
        for work in step.hooked:
            if work.error is not None:
                continue
            if step.layers_seen != self.num_kv_layers:
                work.error = (
                    f"the attention hook ran in {step.layers_seen} of {self.num_kv_layers} "
                    "layers (a layer ran without the plugin's backend hook: FULL CUDA graph "
                    "replay, micro-batching or an unwrapped backend)"
                )
            elif work.plan.evict_to is not None and work.layers_compacted != step.layers_seen:
                work.error = (
                    f"compacted in {work.layers_compacted} of {self.num_kv_layers} attention layers"
                )
        agreed = self.ranks.all_agree([w.error is None for w in step.hooked])
        for work, ok in zip(step.hooked, agreed, strict=True):
            if work.error is None and not ok:
                work.error = "another tensor-parallel rank did not run this row's eviction step"
            if work.error is not None:
                self.report["failed"][work.req_id] = work.error
                self.drop(work.req_id)  # it runs unbudgeted from now on: its state is dead
            elif work.plan.evict_to is not None:
                self.report["compacted"][work.req_id] = work.plan.evict_to
                self._trim_blocks(work.req_id, work.row, work.plan.evict_to)
            if work.error is None:
                self._covered(work)

    def _covered(self, work: RowWork) -> None:
        """What the request's state (if any) covers after this confirmed step."""
        st = self.requests.get(work.req_id)
        if st is not None:
            st.tokens = work.seen_before + work.q_end - work.q_start
            st.cache = work.cache_len if work.plan.evict_to is None else work.plan.evict_to

    def _trim_blocks(self, req_id: str, row: int, keep_tokens: int) -> None:
        """Drop every block past the first ``ceil(keep_tokens / bs)`` from the worker's
        records, as the scheduler drops them from the KV cache manager's."""
        r = self.runner
        for bt in r.input_batch.block_table.block_tables:
            bt.num_blocks_per_row[row] = min(
                bt.num_blocks_per_row[row], cdiv(keep_tokens, bt.block_size)
            )
        state = r.requests.get(req_id)
        if state is not None:
            keep_blocks = cdiv(keep_tokens, r.cache_config.block_size)
            for ids in state.block_ids:
                del ids[keep_blocks:]

    # 5. report ----------------------------------------------------------------------------
    def attach_report(self, output) -> None:
        """Put the pending report on a real ``ModelRunnerOutput`` (not a shared empty one), or,
        under async scheduling, on the one an ``AsyncModelRunnerOutput`` hands the scheduler
        (its ``_model_runner_output``, else what its ``get_output()`` returns). Each entry is
        stamped with the generation of the plan it answers (``REPORT_GENERATION``)."""
        if output is None or not any(self.report.values()):
            return
        from vllm.v1.outputs import (
            EMPTY_MODEL_RUNNER_OUTPUT,
            AsyncModelRunnerOutput,
            ModelRunnerOutput,
        )

        from vllm_caote.engine.plan import REPORT_GENERATION

        report = self.report
        # the step's plans: a step with plans always has a real output, so none is left over
        gens = report.setdefault(REPORT_GENERATION, {})
        for kind in ("compacted", "failed"):
            for rid in report[kind]:
                if rid in self.plans:
                    gens.setdefault(rid, self.plans[rid].generation)
        if isinstance(output, AsyncModelRunnerOutput):
            inner = getattr(output, "_model_runner_output", None)
            if isinstance(inner, ModelRunnerOutput) and inner is not EMPTY_MODEL_RUNNER_OUTPUT:
                setattr(inner, REPORT_ATTR, report)
            else:  # another wrapper: the report rides on what get_output() builds
                get_output = output.get_output

                def with_report() -> ModelRunnerOutput:
                    out = get_output()
                    if out is not EMPTY_MODEL_RUNNER_OUTPUT:  # else: unconfirmed, falls back
                        setattr(out, REPORT_ATTR, report)
                    return out

                output.get_output = with_report
        elif output is EMPTY_MODEL_RUNNER_OUTPUT or not isinstance(output, ModelRunnerOutput):
            return
        else:
            setattr(output, REPORT_ATTR, report)
        self.report = {"compacted": {}, "failed": {}}


def scorer_for(policy: Policy, plan: StepPlan, prefill_base: str) -> Policy:
    """What scores this step's eviction: ``policy`` itself, except for a query-aware, stateless
    policy evicting before the prompt's end (its window then holds text, not the question)
    when the operator chose ``prefill_base: keydiff``: then the same meta-score over KeyDiff."""
    if (
        prefill_base == "own"
        or plan.prompt_done
        or plan.evict_to is None
        or not policy.needs_attention
        or policy.stateful
    ):
        return policy
    prefix = {None: "", "caote": "caote-", "fast-caote": "fast-caote-"}[policy.meta]
    return get_policy(prefix + prefill_base)


_ACTIVE: list[WorkerEviction] = []


def current() -> WorkerEviction | None:
    """The eviction state of the model runner whose forward pass is running (one per worker)."""
    return _ACTIVE[-1] if _ACTIVE else None


def activate(ev: WorkerEviction) -> None:
    _ACTIVE.append(ev)


def deactivate() -> None:
    _ACTIVE.pop()


# 3. layers ---------------------------------------------------------------------------------
def after_attention(impl, layer, query: torch.Tensor, kv_cache: torch.Tensor, kind: str) -> None:
    """One layer's eviction work, after the stock attention kernel wrote and read its KV."""
    ev = current()
    if ev is None or ev.step is None:
        return
    if query.shape[0] < ev.step.num_tokens:  # a dummy / profiling pass, not our batch
        return
    if graphs.full_graph_step():  # as under FULL replay: missed, and caught in finish_step
        return
    ev.step.layers_seen += 1
    name = getattr(layer, "layer_name", None) or str(id(layer))
    # contained like the rows below: a failure fails the rows that needed the queries
    query = layer_queries(ev.step.rows, ev.rings, name, query, layer)
    layout = None
    evicting: list[evict.Evicting] = []
    for work in ev.step.per_layer:
        policy = work.policy
        # A score that sums over the layer's heads needs every rank's heads: each rank joins
        # that sum for every planned row, even one it already failed, so none waits forever.
        joint = _cross_rank(ev, work, work.scorer)
        if work.error is not None:
            joint.poison()
            continue
        # Contained: a failure here costs this request its eviction (the scheduler recomputes
        # it without), never the engine or another request.
        try:
            layout = layout or compaction.layout_for(impl, layer, kv_cache, kind)
            cache = None
            if policy.stateful:
                cache = evict.read(layout, kv_cache, work, impl, layer)
                q = query[work.q_start : work.q_end].transpose(0, 1)  # [Hq, n, d]
                advance_h2o(
                    evict.layer_state(ev, work, name), policy, q, cache[2], getattr(impl, "scale", None)
                )  # fmt: skip
            if policy.tracks_queries:
                q = query[work.q_start : work.q_end].transpose(0, 1)
                table = ev.rope.for_layer(name)
                advance_moments(
                    evict.layer_state(ev, work, name), q, work.seen_before, ev.settings.sinks, table
                )  # fmt: skip
            if work.plan.evict_to is None:
                continue
            if ev.skip_compaction is not None and ev.skip_compaction(work.req_id):
                joint.poison()
                continue
            evicting.append(evict.Evicting(work, joint, cache))
        except Exception as e:  # noqa: BLE001 - contained per request, reported to the scheduler
            joint.poison()
            work.error = f"{type(e).__name__} in layer {name}: {e}"
            logger.exception("vllm-caote: eviction of request %s failed", work.req_id)
    if evicting:
        # every row that evicts here: one scoring call, then per-request selection and writes
        t0 = ev.timer.start()
        evict.compact_layer(ev, evicting, name, impl, layer, layout, kv_cache)
        ev.timer.stop(t0)


def _cross_rank(ev: WorkerEviction, work: RowWork, policy) -> _HeadSum:
    if ev.ranks.world_size <= 1 or work.plan.evict_to is None or not policy.cross_head:
        return _HeadSum(None)
    return _HeadSum(ev.ranks, policy.head_sum_length(work.cache_len), ev.runner.device)
