"""The V1 model runner for one engine, chosen on its config, not in the process environment.

Eviction hooks vLLM's V1 ``GPUModelRunner`` (:mod:`vllm_caote.engine.model_runner`). vLLM 0.32
picks V1 or V2 in the ``VllmConfig.use_v2_model_runner`` property (``VLLM_USE_V2_MODEL_RUNNER``,
else V2 where Triton is present and the features allow it) and every process reads it from the
config it was handed: the engine core's scheduler, the workers, the API server's input
processor. :func:`choose_v1` gives one built config this subclass, so the engine it describes,
and only that engine, runs V1; the environment, and any other engine in the process, are
untouched. The class travels with the config when vLLM pickles it to its other processes.

Removal: when the plugin hooks the V2 runner (``docs/architecture.md``, "The V2 runner").
"""

from __future__ import annotations

from vllm.config import VllmConfig

#: features vLLM 0.32 runs only on the V2 runner (config attribute path -> what the user set)
V2_ONLY = (
    ("attention_config.hisparse_config", "HiSparse attention"),
    ("watermark_config", "watermarking"),
    ("model_config.return_sampling_mask", "sampling distribution replay"),
    ("model_config.enable_trace_replay", "trace replay"),
    ("profiler_config.proton_graph_attribution", "Proton CUDA graph attribution"),
)


#: the same features as ``EngineArgs`` fields, refused before vLLM builds its config (on a
#: host without Triton vLLM would otherwise refuse them first, naming its own reason)
V2_ONLY_ARGS = (
    ("return_sampling_mask", "sampling distribution replay"),
    ("enable_trace_replay", "trace replay"),
)


class V1RunnerVllmConfig(VllmConfig):
    """vLLM's config, with the V1 model runner for this engine."""

    @property
    def use_v2_model_runner(self) -> bool:
        return False


def _get(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def v2_only_features(vllm_config, table=V2_ONLY) -> list[str]:
    """The features set on ``vllm_config`` (or ``EngineArgs`` with :data:`V2_ONLY_ARGS`) that
    only the V2 runner serves."""
    return [what for path, what in table if _get(vllm_config, path) not in (None, False)]


def choose_v1(vllm_config) -> bool:
    """Give ``vllm_config`` the V1 runner; returns whether vLLM had chosen V2 for it. The
    caller refuses first what only V2 serves (:func:`v2_only_features`). vLLM's own V1 checks
    run again, since the config was built for the runner vLLM chose."""
    was_v2 = bool(vllm_config.use_v2_model_runner)
    if not isinstance(vllm_config, V1RunnerVllmConfig):
        vllm_config.__class__ = V1RunnerVllmConfig
    vllm_config._validate_v1_model_runner()
    return was_v2
