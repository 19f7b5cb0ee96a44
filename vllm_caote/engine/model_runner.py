"""Worker side of eviction: input preparation, per-step context and the handshake.

:func:`runner_class` subclasses vLLM's V1 ``GPUModelRunner`` (or ``CPUModelRunner``, itself a
subclass); the plugin's workers (:mod:`vllm_caote.engine.worker`) build the runner with it.

* ``_update_states``   drop worker state of finished / restarted requests;
* ``_prepare_inputs``  positions stay the true token indices (RoPE), while cache slots and
                       ``seq_lens`` count the compacted cache: ``slot = position - offset``;
* ``execute_model``    after the forward pass, shrink the block-table rows of requests whose
                       compaction succeeded in every layer, and write the step's report;
* ``sample_tokens``    hand the report (and eviction timings) to the scheduler on the step's
                       ``ModelRunnerOutput`` (:data:`~vllm_caote.engine.plan.REPORT_ATTR`);
* ``initialize_kv_cache``  refuse, at startup, layers eviction cannot compact correctly.

The per-step context (:class:`StepContext`) is what the attention backend reads to score and
compact each layer (:mod:`vllm_caote.engine.attention`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_caote.config import settings
from vllm_caote.engine.plan import PLAN_ATTR, REPORT_ATTR, StepPlan, cdiv

logger = logging.getLogger("vllm.vllm_caote.engine")


@dataclass
class LayerState:
    ring: torch.Tensor | None = None  # [Hq, w, d] last w queries, slot = token index % w
    recorded: int = 0  # queries written to the ring (prefix-cache hits have none)
    h2o: torch.Tensor | None = None  # [Hkv, cache_len] running attention sum (H2O policies)


@dataclass
class RequestState:
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
    layers_compacted: int = 0
    error: str | None = None  # set by the first layer that failed; later layers skip the row


@dataclass
class StepContext:
    num_tokens: int
    rows: list[RowWork]
    layers_seen: int = 0  # attention layers that ran the eviction hook on this batch


class WorkerEviction:
    """Per model-runner eviction state."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.settings = settings(runner.vllm_config)
        self.requests: dict[str, RequestState] = {}
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

    def update_states(self, scheduler_output) -> None:
        for rid in scheduler_output.finished_req_ids:
            self.requests.pop(rid, None)
        self.plans = getattr(scheduler_output, PLAN_ATTR, None) or {}
        for rid, p in self.plans.items():
            if p.reset:
                self.requests.pop(rid, None)

    def prepare_inputs(self, num_scheduled_tokens: np.ndarray) -> None:
        self.step = None
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
                    rid, row, int(qsl[row]), int(qsl[row + 1]), cache_len, computed,
                    blocks.to(r.device), plan,
                )
            )  # fmt: skip
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
        """Confirm the compactions done in every layer; block-table rows shrink with them."""
        step, self.step = self.step, None
        if step is None:
            return
        bts = self.runner.input_batch.block_table.block_tables
        for work in step.rows:
            keep = work.plan.evict_to
            if keep is None:
                continue
            if work.error is None and (
                step.layers_seen != self.num_kv_layers or work.layers_compacted != step.layers_seen
            ):
                work.error = (
                    f"compacted in {work.layers_compacted} of {self.num_kv_layers} attention "
                    "layers (a layer that ran without the plugin's backend hook: CUDA graph "
                    "replay, micro-batching or an unwrapped backend)"
                )
            if work.error is not None:
                self.report["failed"][work.req_id] = work.error
                continue
            self.report["compacted"][work.req_id] = keep
            for bt in bts:
                bt.num_blocks_per_row[work.row] = min(
                    bt.num_blocks_per_row[work.row], cdiv(keep, bt.block_size)
                )

    def attach_report(self, output) -> None:
        """Put the pending report on a real ``ModelRunnerOutput`` (not a shared empty one)."""
        if output is None or not (self.report["compacted"] or self.report["failed"]):
            return
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

        if output is EMPTY_MODEL_RUNNER_OUTPUT or not isinstance(output, ModelRunnerOutput):
            return
        setattr(output, REPORT_ATTR, self.report)
        self.report = {"compacted": {}, "failed": {}}


_ACTIVE: list[WorkerEviction] = []


def current() -> WorkerEviction | None:
    """The eviction state of the model runner whose forward pass is running (one per worker)."""
    return _ACTIVE[-1] if _ACTIVE else None


def runner_class(base: type) -> type:
    """``base`` (vLLM's V1 ``GPUModelRunner`` or a subclass such as ``CPUModelRunner``) with
    the eviction hooks. A direct subclass holding no state until first used, so a built runner
    can also be given it by ``__class__`` assignment."""

    class CaoteModelRunner(base):  # type: ignore[misc,valid-type]
        _caote_runner = True

        @property
        def caote(self) -> WorkerEviction:
            st = self.__dict__.get("_caote")
            if st is None:
                st = self.__dict__["_caote"] = WorkerEviction(self)
            return st

        def initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
            out = super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
            self.caote.num_kv_layers = check_attention_layers(self, kv_cache_config)
            return out

        def _update_states(self, scheduler_output):
            self.caote.update_states(scheduler_output)
            return super()._update_states(scheduler_output)

        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
            out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs)
            self.caote.prepare_inputs(num_scheduled_tokens)
            return out

        def execute_model(self, scheduler_output, *args, **kwargs):
            from vllm_caote.metrics.engine import collect_worker_timings

            st = self.caote
            st.plans = {}
            _ACTIVE.append(st)
            try:
                out = super().execute_model(scheduler_output, *args, **kwargs)
            finally:
                _ACTIVE.pop()
                st.finish_step()
            collect_worker_timings(self, scheduler_output)
            self._caote_attach(out)
            return out

        def sample_tokens(self, *args, **kwargs):
            out = super().sample_tokens(*args, **kwargs)
            self._caote_attach(out)
            return out

        def _caote_attach(self, out) -> None:
            from vllm_caote.metrics.engine import attach_worker_timings

            self.caote.attach_report(out)
            attach_worker_timings(self, out)

    CaoteModelRunner.__name__ = CaoteModelRunner.__qualname__ = f"Caote{base.__name__}"
    return CaoteModelRunner


class UnsupportedLayerError(RuntimeError):
    """An attention layer eviction cannot compact correctly; the message names it."""


def check_attention_layers(runner, kv_cache_config) -> int:
    """Every KV-cache layer must run the plugin's attention hook on a plain, unshared cache.

    Returns the number of such layers (each must confirm a compaction before blocks are freed).
    """
    from vllm_caote.engine.attention import is_caote_impl

    ctx = runner.vllm_config.compilation_config.static_forward_context
    names = [n for g in kv_cache_config.kv_cache_groups for n in g.layer_names]
    for name in names:
        layer = ctx.get(name)
        impl = getattr(layer, "impl", None)
        if impl is None:
            continue
        if getattr(layer, "kv_sharing_target_layer_name", None) or getattr(
            impl, "kv_sharing_target_layer_name", None
        ):
            raise UnsupportedLayerError(
                f"vllm-caote: layer {name} shares another layer's KV cache (KV sharing); "
                "KV eviction does not support it. Serve this model without the plugin "
                "(CAOTE_DISABLE=1)."
            )
        if getattr(impl, "alibi_slopes", None) is not None:
            raise UnsupportedLayerError(
                f"vllm-caote: layer {name} uses ALiBi position biases, which are computed from "
                "cache indices; compaction would shift them. Serve this model without the "
                "plugin (CAOTE_DISABLE=1)."
            )
        if not is_caote_impl(impl):
            raise UnsupportedLayerError(
                f"vllm-caote: layer {name} runs attention backend {type(impl).__name__}, which "
                "the plugin does not wrap (supported: CPU_ATTN, FLASH_ATTN, TRITON_ATTN). Pick "
                "one with --attention-backend, or serve without the plugin (CAOTE_DISABLE=1)."
            )
    return len(names)
