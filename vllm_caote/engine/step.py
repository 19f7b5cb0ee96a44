"""The worker side of one eviction step, in the order it runs.

1. **plan**      ``update_states``: the scheduler's :class:`~vllm_caote.engine.plan.StepPlan`
                 per budgeted request arrives on the ``SchedulerOutput``;
2. **inputs**    ``prepare_inputs``: positions stay the true token indices (RoPE), while cache
                 slots and ``seq_lens`` count the compacted cache (``slot = position - offset``);
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
cache manager's (``tests/test_engine_schedules.py`` checks it across skipped steps).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vllm_caote.config import settings
from vllm_caote.engine import compaction, observe
from vllm_caote.engine.plan import PLAN_ATTR, REPORT_ATTR, StepPlan, cdiv
from vllm_caote.engine.queries import QueryRings
from vllm_caote.engine.rope import ModelRope
from vllm_caote.engine.state import (
    LayerState,
    RequestState,
    advance_h2o,
    advance_moments,
    moment_knobs,
)
from vllm_caote.scoring import get_policy, select_keep
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


class Ranks:
    """The tensor-parallel group as eviction needs it: every rank holds some KV heads of every
    request, runs the same plan, and must agree before any block is freed.

    ``group`` / ``device_group`` are ``torch.distributed`` groups (None: a single rank)."""

    def __init__(self, world_size: int = 1, group=None, device_group=None) -> None:
        self.world_size = world_size
        self.group = group  # CPU (gloo) group: the per-step agreement
        self.device_group = device_group  # the cache's device: cross-head score sums

    @classmethod
    def of_tensor_parallel(cls) -> Ranks:
        try:
            from vllm.distributed.parallel_state import get_tp_group

            tp = get_tp_group()
        except (AssertionError, ImportError):  # no distributed state: a single rank
            return cls()
        if tp.world_size <= 1:
            return cls()
        return cls(tp.world_size, tp.cpu_group, tp.device_group)

    def all_agree(self, flags: list[bool]) -> list[bool]:
        """Element-wise AND of ``flags`` over the ranks (one collective; every rank calls it
        with a list of the same length, as they all run the same plan)."""
        if self.world_size <= 1 or not flags:
            return flags
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return [bool(v) for v in t.tolist()]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (a NaN anywhere poisons every rank's result)."""
        if self.world_size <= 1:
            return t
        t = t.contiguous()
        torch.distributed.all_reduce(t, group=self.device_group)
        return t


class WorkerEviction:
    """Per model-runner eviction state."""

    def __init__(self, runner, ranks: Ranks | None = None) -> None:
        self.runner = runner
        self.settings = settings(runner.vllm_config)
        self.ranks = ranks if ranks is not None else Ranks.of_tensor_parallel()
        self.requests: dict[str, RequestState] = {}
        self.rings = QueryRings(self.settings.window, runner.device)
        self.rope = ModelRope(runner)
        self.plans: dict[str, StepPlan] = {}
        self.step: StepContext | None = None
        self.num_kv_layers = 0  # attention layers with a KV cache (set at KV-cache init)
        self.kv_cache_dtype = str(runner.cache_config.cache_dtype)
        # Report for the next ModelRunnerOutput: {"compacted": {...}, "failed": {...}}.
        self.report: dict[str, dict] = {"compacted": {}, "failed": {}}
        # Time spent scoring + compacting, drained by the metrics hook.
        self.eviction_seconds: list[float] = []
        self.step_policies: list[str] = []
        #: Fault-injection seam (tests): requests for which it returns True skip compaction,
        #: as a worker that cannot compact would. The scheduler must then not free blocks.
        self.skip_compaction: Callable[[str], bool] | None = None

    def request(self, req_id: str) -> RequestState:
        st = self.requests.get(req_id)
        if st is None:
            st = self.requests[req_id] = RequestState()
        return st

    # 1. plan ------------------------------------------------------------------------------
    def update_states(self, scheduler_output) -> None:
        for rid in scheduler_output.finished_req_ids:
            self.requests.pop(rid, None)
            self.rings.release(rid)
        self.plans = getattr(scheduler_output, PLAN_ATTR, None) or {}
        for rid, p in self.plans.items():
            if p.reset:
                self.requests.pop(rid, None)
                self.rings.release(rid)

    # 2. inputs ----------------------------------------------------------------------------
    def prepare_inputs(self, num_scheduled_tokens: np.ndarray) -> None:
        self.step = None
        if not self.plans:
            self.rings.plan_step(())
            return
        r = self.runner
        ib = r.input_batch
        num_reqs = ib.num_reqs
        total = int(num_scheduled_tokens[:num_reqs].sum())
        offsets = np.zeros(num_reqs, dtype=np.int64)
        qsl = r.query_start_loc.np
        bt0 = ib.block_table.block_tables[0]
        rows: list[RowWork] = []
        for rid, plan in self.plans.items():
            row = ib.req_id_to_index.get(rid)
            if row is None or row >= num_reqs:
                continue
            offsets[row] = plan.offset
            n = int(num_scheduled_tokens[row])
            computed = int(ib.num_computed_tokens_cpu[row])
            cache_len = computed - plan.offset + n
            nb = cdiv(cache_len, bt0.block_size)
            blocks = torch.from_numpy(bt0.block_table.np[row, :nb].astype(np.int64))
            policy = get_policy(plan.policy)
            rows.append(
                RowWork(
                    rid, row, int(qsl[row]), int(qsl[row + 1]), cache_len, computed,
                    blocks.to(r.device), plan, policy,
                    scorer=scorer_for(policy, plan, self.settings.prefill_base),
                )
            )  # fmt: skip
        self.rings.plan_step(
            (w.req_id, w.q_start, w.q_end, w.seen_before)
            for w in rows
            if w.policy.needs_queries and not (w.policy.stateful or w.policy.tracks_queries)
        )
        if offsets.any():
            off = torch.from_numpy(offsets).to(r.seq_lens.device)
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
        planned = [w for w in step.rows if w.plan.evict_to is not None]
        for work in planned:
            if work.error is None and (
                step.layers_seen != self.num_kv_layers or work.layers_compacted != step.layers_seen
            ):
                work.error = (
                    f"compacted in {work.layers_compacted} of {self.num_kv_layers} attention "
                    "layers (a layer that ran without the plugin's backend hook: CUDA graph "
                    "replay, micro-batching or an unwrapped backend)"
                )
        agreed = self.ranks.all_agree([w.error is None for w in planned])
        for work, ok in zip(planned, agreed, strict=True):
            if work.error is None and not ok:
                work.error = "another tensor-parallel rank did not complete the compaction"
            if work.error is not None:
                self.report["failed"][work.req_id] = work.error
                continue
            self.report["compacted"][work.req_id] = work.plan.evict_to
            self._trim_blocks(work.req_id, work.row, work.plan.evict_to)

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
        """Put the pending report on a real ``ModelRunnerOutput`` (not a shared empty one)."""
        if output is None or not (self.report["compacted"] or self.report["failed"]):
            return
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

        if output is EMPTY_MODEL_RUNNER_OUTPUT or not isinstance(output, ModelRunnerOutput):
            return
        setattr(output, REPORT_ATTR, self.report)
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
    ev.step.layers_seen += 1
    name = getattr(layer, "layer_name", None) or str(id(layer))
    query = compaction.dequantize_queries(query, layer)
    ev.rings.record(name, query)  # every recording row at once
    layout = None
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
                cache = _read(layout, kv_cache, work, impl, layer)
                q = query[work.q_start : work.q_end].transpose(0, 1)  # [Hq, n, d]
                advance_h2o(
                    _layer(ev, work, name), policy, q, cache[2], getattr(impl, "scale", None)
                )
            if policy.tracks_queries:
                q = query[work.q_start : work.q_end].transpose(0, 1)
                table = ev.rope.for_layer(name)
                advance_moments(
                    _layer(ev, work, name), q, work.seen_before, ev.settings.sinks, table
                )
            if work.plan.evict_to is None:
                continue
            if ev.skip_compaction is not None and ev.skip_compaction(work.req_id):
                joint.poison()
                continue
            t0 = time.perf_counter()
            _compact(ev, work, name, impl, layer, work.scorer, layout, kv_cache, cache, joint)
            ev.eviction_seconds.append(time.perf_counter() - t0)
            work.layers_compacted += 1
        except Exception as e:  # noqa: BLE001 - contained per request, reported to the scheduler
            joint.poison()
            work.error = f"{type(e).__name__} in layer {name}: {e}"
            logger.exception("vllm-caote: eviction of request %s failed", work.req_id)


class _HeadSum:
    """The cross-rank head sum of one (row, layer): called exactly once on every rank, by the
    score (``__call__``) or, when the row failed or skipped before it, by :meth:`poison`."""

    def __init__(self, ranks: Ranks | None, length: int = 0, device=None) -> None:
        self.ranks, self.length, self.device = ranks, length, device
        self.done = ranks is None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.done:
            return t
        self.done = True
        out = self.ranks.sum(t.to(torch.float64))  # one dtype on every rank, whatever scores
        if torch.isnan(out).any():
            raise RuntimeError("another tensor-parallel rank failed this eviction")
        return out.to(t.dtype)

    def poison(self) -> None:
        if not self.done:
            self.done = True
            nan = torch.full((self.length,), float("nan"), dtype=torch.float64, device=self.device)
            self.ranks.sum(nan)


def _cross_rank(ev: WorkerEviction, work: RowWork, policy) -> _HeadSum:
    if ev.ranks.world_size <= 1 or work.plan.evict_to is None or not policy.cross_head:
        return _HeadSum(None)
    return _HeadSum(ev.ranks, policy.head_sum_length(work.cache_len), ev.runner.device)


def _read(layout, kv_cache, work: RowWork, impl, layer):
    """The request's cache as stored and dequantised for scoring: ``(raw_k, raw_v, k, v)``,
    each ``[Hkv, n, d]``."""
    raw_k, raw_v = layout.read(kv_cache, work.block_ids, work.cache_len)
    return (
        raw_k,
        raw_v,
        *compaction.dequantize(raw_k, raw_v, str(getattr(impl, "kv_cache_dtype", "auto")), layer),
    )


def _layer(ev, work: RowWork, name: str) -> LayerState:
    return ev.request(work.req_id).layers.setdefault(name, LayerState())


def _compact(ev, work: RowWork, name, impl, layer, policy, layout, kv_cache, cache, joint) -> None:
    cfg = ev.settings
    raw_keys, raw_values, keys, values = cache or _read(layout, kv_cache, work, impl, layer)
    ls = _layer(ev, work, name)
    if policy.stateful:
        scores = policy.score_from_state(values, ls.h2o)
    else:
        queries = None
        total = work.seen_before + (work.q_end - work.q_start)  # true tokens after the step
        if policy.needs_queries and not policy.tracks_queries:
            queries = ev.rings.window_queries(work.req_id, name, total)
        # one rank: the plain mean (bit-for-bit the single-process scores)
        knobs = {"reduce_heads": joint} if joint.ranks is not None else {}
        if policy.tracks_queries:
            knobs.update(moment_knobs(ls, ev.rope.for_layer(name), total, keys.device))
        scores, _ = policy.score_with_state(
            keys,
            values,
            queries=queries,
            sinks=cfg.sinks,
            scale=getattr(impl, "scale", None),
            **knobs,
        )
    # the protected head (shared prefix-cache blocks) is kept like sinks, and never written
    head = work.plan.protected
    keep_idx = select_keep(
        scores,
        work.plan.evict_to,
        protect_recent=cfg.window,
        sinks=max(cfg.sinks, head),
        span=policy.span,
    )
    observe.notify(work.req_id, name, work.seen_before + work.q_end - work.q_start, work.cache_len, keep_idx)  # fmt: skip
    moved = keep_idx[:, head:]
    # the stored (possibly quantised) bytes move; nothing is re-quantised
    layout.write(
        kv_cache,
        work.block_ids[head // kv_cache.shape[2] :],
        compaction.take_tokens(raw_keys, moved),
        compaction.take_tokens(raw_values, moved),
    )
    if ls.h2o is not None:
        ls.h2o = torch.gather(ls.h2o, 1, keep_idx.to(ls.h2o.device))
