"""CUDA-graph mode per step: full graphs for every step in which no budgeted row needs the hook.

A replayed FULL CUDA graph never calls the plugin's Python attention wrapper
(:mod:`vllm_caote.engine.attention`): no window query is recorded, no per-request scoring state
advances and no compaction runs. PIECEWISE graphs leave attention eager, so the hook runs. The
plugin therefore keeps the user's (or vLLM's default) graph mode and excludes FULL only for the
steps that need the hook, through vLLM's own dispatcher: ``CudagraphDispatcher.dispatch`` takes
``invalid_modes``, exactly as vLLM excludes FULL for encoder-decoder steps.

Invariant: for a step in which some scheduled budgeted row needs the hook
(:attr:`vllm_caote.engine.step.StepContext.needs_hook`), the runner is never handed FULL unless
the caller allowed nothing else (data-parallel re-dispatch to a mode every rank agreed on, which
cannot be FULL when this rank asked for less: the agreement takes the minimum). Such a row is
then caught after the step (``WorkerEviction.finish_step``: it missed the hook in some layer)
and falls back; nothing is freed for it.

The order in vLLM 0.32's ``GPUModelRunner.execute_model`` that makes this possible:
``_prepare_inputs`` (the step's rows are known: ``WorkerEviction.prepare_inputs``) runs before
``_determine_batch_execution_and_padding``, which calls the dispatcher.

What a FULL step costs the plugin: nothing for unbudgeted traffic; a KeyDiff or StreamingLLM
row between its compactions needs no hook (its scores read only the cache), so it rides FULL
graphs too. Rows that record window queries (SnapKV, TOVA and their CAOTE forms), advance state
(H2O, Expected Attention) or compact in the step take PIECEWISE for that step, or eager where
the user chose FULL only (no piecewise graphs were captured).
"""

from __future__ import annotations

from collections.abc import Callable

_CLASSES: dict[type, type] = {}


def dispatcher_class(base: type) -> type:
    """``base`` (vLLM's ``CudagraphDispatcher``) that excludes FULL for steps needing the hook."""

    class EvictionGraphDispatcher(base):  # type: ignore[misc,valid-type]
        #: True while the step being dispatched has a budgeted row that needs the hook
        caote_needs_hook: Callable[[], bool] | None = None
        #: modes handed out for steps that needed the hook (metrics, tests)
        caote_hook_steps: dict[str, int]

        def dispatch(
            self,
            num_tokens,
            uniform_decode=False,
            has_lora=False,
            num_active_loras=0,
            valid_modes=None,
            invalid_modes=None,
        ):
            from vllm.config.compilation import CUDAGraphMode

            needs = self.caote_needs_hook
            if needs is not None and needs():
                allowed = set(valid_modes or CUDAGraphMode.valid_runtime_modes())
                if allowed - {CUDAGraphMode.FULL}:  # else the caller allows FULL alone
                    invalid_modes = set(invalid_modes or ()) | {CUDAGraphMode.FULL}
            mode, desc = super().dispatch(
                num_tokens,
                uniform_decode=uniform_decode,
                has_lora=has_lora,
                num_active_loras=num_active_loras,
                valid_modes=valid_modes,
                invalid_modes=invalid_modes,
            )
            if needs is not None and needs():
                counts = self.__dict__.setdefault("caote_hook_steps", {})
                counts[mode.name] = counts.get(mode.name, 0) + 1
            return mode, desc

    return EvictionGraphDispatcher


def adopt(dispatcher, needs_hook: Callable[[], bool]):
    """Make one runner's dispatcher exclude FULL for hook steps (``__class__`` assignment: the
    same instance, its captured keys kept; no global patch). Returns the dispatcher."""
    base = type(dispatcher)
    if not getattr(base, "_caote_graphs", False):
        if base not in _CLASSES:
            cls = dispatcher_class(base)
            cls.__name__ = cls.__qualname__ = f"Eviction{base.__name__}"
            cls._caote_graphs = True  # type: ignore[attr-defined]
            _CLASSES[base] = cls
        dispatcher.__class__ = _CLASSES[base]
    dispatcher.caote_needs_hook = needs_hook
    return dispatcher


def full_graph_step() -> bool:
    """True inside a forward vLLM runs as a FULL CUDA graph. On a GPU the attention wrapper's
    Python never runs under FULL replay; the hook returns at once here so that a runner without
    graphs (vLLM-CPU, eager) handed FULL behaves as replay would: the hook is missed."""
    try:
        from vllm.config.compilation import CUDAGraphMode
        from vllm.forward_context import get_forward_context, is_forward_context_available
    except ImportError:  # pragma: no cover
        return False
    if not is_forward_context_available():
        return False
    return get_forward_context().cudagraph_runtime_mode == CUDAGraphMode.FULL
