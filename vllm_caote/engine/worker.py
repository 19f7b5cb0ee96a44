"""The plugin's workers: vLLM's own, with the eviction model runner.

Selected through vLLM's ``parallel_config.worker_cls`` (:mod:`vllm_caote.configure` maps each
stock worker to the class here), so nothing of vLLM's worker or runner is patched globally:

* ``CaoteGPUWorker`` overrides ``Worker._make_model_runner``, vLLM's own hook for choosing the
  runner class, to build ``GPUModelRunner`` with eviction (:func:`runner_class`);
* ``CaoteCPUWorker``: ``CPUWorker.init_device`` builds its ``CPUModelRunner`` inline (no hook),
  so right after it the runner instance is given the eviction subclass (``__class__``
  assignment before the model is loaded; the subclass holds no state until first used).

Only the V1 runner is supported; the V2 runner is refused at startup (``vllm_caote.configure``).
"""

from __future__ import annotations

from vllm_caote.engine.model_runner import runner_class

_RUNNERS: dict[type, type] = {}


def with_eviction(runner_cls: type) -> type:
    """``runner_cls`` with the eviction hooks (one class per runner class)."""
    if getattr(runner_cls, "_caote_runner", False):
        return runner_cls
    if runner_cls not in _RUNNERS:
        _RUNNERS[runner_cls] = runner_class(runner_cls)
    return _RUNNERS[runner_cls]


def _check_v1_runner(runner) -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not isinstance(runner, GPUModelRunner):
        raise RuntimeError(
            f"vllm-caote: the worker built {type(runner).__module__}.{type(runner).__name__}, "
            "not vLLM's V1 GPUModelRunner family; KV eviction needs the V1 runner "
            "(VLLM_USE_V2_MODEL_RUNNER=0)."
        )


def _gpu_worker():
    from vllm.v1.worker.gpu_worker import Worker

    class CaoteGPUWorker(Worker):
        def _make_model_runner(self):
            runner = super()._make_model_runner()
            _check_v1_runner(runner)
            runner.__class__ = with_eviction(type(runner))
            return runner

    return CaoteGPUWorker


def _cpu_worker():
    from vllm.v1.worker.cpu_worker import CPUWorker

    class CaoteCPUWorker(CPUWorker):
        def init_device(self):
            super().init_device()
            _check_v1_runner(self.model_runner)
            self.model_runner.__class__ = with_eviction(type(self.model_runner))

    return CaoteCPUWorker


#: stock worker class path -> the plugin's subclass of it (a name in this module)
WORKERS = {
    "vllm.v1.worker.gpu_worker.Worker": "CaoteGPUWorker",
    "vllm.v1.worker.cpu_worker.CPUWorker": "CaoteCPUWorker",
}
_FACTORIES = {"CaoteGPUWorker": _gpu_worker, "CaoteCPUWorker": _cpu_worker}
_BUILT: dict[str, type] = {}


def __getattr__(name: str):
    # vLLM resolves worker_cls by qualified name ("vllm_caote.engine.worker.CaoteCPUWorker");
    # classes are built on first use so importing this module never imports CUDA code.
    factory = _FACTORIES.get(name)
    if factory is None:
        raise AttributeError(name)
    if name not in _BUILT:
        cls = factory()
        cls.__name__ = cls.__qualname__ = name
        cls.__module__ = __name__
        _BUILT[name] = cls
    return _BUILT[name]


def plugin_worker_for(stock: str) -> str | None:
    """The plugin's worker class path for a stock ``worker_cls``, or None if there is none."""
    name = WORKERS.get(stock)
    return None if name is None else f"{__name__}.{name}"
