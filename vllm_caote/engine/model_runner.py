"""Worker side of eviction: input preparation and per-step context (worker processes).

Wraps ``vllm.v1.worker.gpu_model_runner.GPUModelRunner`` (``CPUModelRunner`` subclasses it, so
one patch serves both):

* ``_update_states``  drop worker state of finished / restarted requests;
* ``_prepare_inputs`` positions stay the true token indices (RoPE), while cache slots and
                      ``seq_lens`` count the compacted cache: ``slot = position - offset``;
* ``execute_model``   after the forward pass, shrink the block-table rows of requests that
                      compacted, mirroring the blocks the scheduler frees.

The per-step context (:class:`StepContext`) is what the attention backend reads to score and
compact each layer (:mod:`vllm_caote.engine.attention`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_caote.config import settings
from vllm_caote.engine.plan import PLAN_ATTR, StepPlan, cdiv


@dataclass
class LayerState:
    ring: torch.Tensor | None = None  # [Hq, w, d] last w queries, slot = token index % w
    h2o: torch.Tensor | None = None  # [Hkv, cache_len] running attention sum (H2O policies)


@dataclass
class RequestState:
    seen: int = 0  # tokens whose queries went through the ring (true count)
    layers: dict[str, LayerState] = field(default_factory=dict)


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


@dataclass
class StepContext:
    num_tokens: int
    rows: list[RowWork]


class WorkerEviction:
    """Per model-runner eviction state."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.settings = settings()
        self.requests: dict[str, RequestState] = {}
        self.plans: dict[str, StepPlan] = {}
        self.step: StepContext | None = None
        self.evicted_this_step: list[tuple[int, int]] = []  # (row, keep_tokens)
        # Time spent scoring + compacting, drained by the metrics hook.
        self.eviction_seconds: list[float] = []

    def request(self, req_id: str) -> RequestState:
        st = self.requests.get(req_id)
        if st is None:
            st = self.requests[req_id] = RequestState()
        return st

    def update_states(self, scheduler_output) -> None:
        for rid in scheduler_output.finished_req_ids:
            self.requests.pop(rid, None)
        self.plans = getattr(scheduler_output, PLAN_ATTR, None) or {}
        for rid, p in self.plans.items():
            if p.reset:
                self.requests.pop(rid, None)

    def prepare_inputs(self, num_scheduled_tokens: np.ndarray) -> None:
        self.step = None
        self.evicted_this_step = []
        if not self.plans:
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
            rows.append(
                RowWork(
                    rid,
                    row,
                    int(qsl[row]),
                    int(qsl[row + 1]),
                    cache_len,
                    computed,
                    blocks.to(r.device),
                    plan,
                )
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

    def finish_step(self) -> None:
        """Block-table rows shrink with the compacted cache (the scheduler frees the tail)."""
        bts = self.runner.input_batch.block_table.block_tables
        for row, keep in self.evicted_this_step:
            for bt in bts:
                bt.num_blocks_per_row[row] = min(
                    bt.num_blocks_per_row[row], cdiv(keep, bt.block_size)
                )
        self.evicted_this_step = []
        self.step = None


_ACTIVE: list[WorkerEviction] = []


def current() -> WorkerEviction | None:
    """The eviction state of the model runner whose forward pass is running (one per worker)."""
    return _ACTIVE[-1] if _ACTIVE else None


def install() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_caote_patched", False):
        return
    GPUModelRunner._caote_patched = True
    orig_update = GPUModelRunner._update_states
    orig_prepare = GPUModelRunner._prepare_inputs
    orig_execute = GPUModelRunner.execute_model

    def _state(self) -> WorkerEviction:
        st = self.__dict__.get("_caote")
        if st is None:
            st = self.__dict__["_caote"] = WorkerEviction(self)
        return st

    def _update_states(self, scheduler_output):
        _state(self).update_states(scheduler_output)
        return orig_update(self, scheduler_output)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        out = orig_prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        _state(self).prepare_inputs(num_scheduled_tokens)
        return out

    def execute_model(self, scheduler_output, *args, **kwargs):
        st = _state(self)
        st.plans = {}
        _ACTIVE.append(st)
        try:
            return orig_execute(self, scheduler_output, *args, **kwargs)
        finally:
            _ACTIVE.pop()
            st.finish_step()

    GPUModelRunner._update_states = _update_states
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner.execute_model = execute_model

    from vllm_caote.metrics.engine import install_worker  # eviction timings to the engine core

    install_worker(GPUModelRunner)
