"""The eviction model runner: vLLM's V1 runner with the step of :mod:`.step` hooked in.

:func:`runner_class` subclasses vLLM's V1 ``GPUModelRunner`` (or ``CPUModelRunner``, itself a
subclass); the plugin's workers (:mod:`vllm_caote.engine.worker`) build the runner with it.
Each override hands one stage to :class:`~vllm_caote.engine.step.WorkerEviction`:

* ``_update_states``   the step's plan (and dropped state of finished / restarted requests);
* ``_prepare_inputs``  true positions, compacted cache slots;
* ``execute_model``    the forward pass with the layer hook active, then the confirmation;
* ``sample_tokens``    the report on the step's ``ModelRunnerOutput``;
* ``initialize_kv_cache``  refuse, at startup, layers eviction cannot compact correctly, and
  give the runner's CUDA-graph dispatcher the per-step exclusion of FULL (:mod:`.graphs`).
"""

from __future__ import annotations

from vllm_caote.engine import graphs, step
from vllm_caote.engine.step import WorkerEviction
from vllm_caote.engine.support import check_attention_layers


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
            # FULL CUDA graphs for every step whose budgeted rows need no hook (graphs.py)
            graphs.adopt(self.cudagraph_dispatcher, self.caote.needs_hook)
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
            step.activate(st)
            try:
                out = super().execute_model(scheduler_output, *args, **kwargs)
            finally:
                step.deactivate()
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
