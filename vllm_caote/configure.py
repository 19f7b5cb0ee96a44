"""Engine configuration: the plugin's classes, self-configured defaults and clear refusals.

Runs inside ``EngineArgs.create_engine_config`` (the one patch that sees every entry point:
``vllm serve``, ``python -m vllm.entrypoints.openai.api_server``, ``vllm.LLM``), so a server
started with stock flags and the plugin installed evicts on budgeted requests. The rule, per
setting eviction cannot run under:

* left at vLLM's *default*: the plugin picks the value it needs and says so in one log line;
* set *explicitly* by the user to a conflicting value: startup fails with a message naming the
  flag to change (or ``CAOTE_DISABLE=1`` to serve without the plugin).

What every request pays once the plugin is installed, budgeted or not: nothing on CUDA graphs
(the user's mode stays; FULL is left out only for the steps in which a budgeted row needs the
attention hook, :mod:`vllm_caote.engine.graphs`) and nothing on async scheduling (its own
scheduler class); the one change is the model runner, V1 for this engine where vLLM would pick
V2, chosen on the engine's config (:mod:`vllm_caote.engine.runner_choice`), never in the
process environment. The startup line lists both.

A ``kv_budget`` is therefore never accepted and then ignored. Flags vLLM itself may reject or
silently reset on some platform (context parallelism, micro-batching, ...) are refused in
:func:`before`, on the ``EngineArgs`` fields, so the user sees the plugin's reason wherever vLLM
would have said something else (or nothing); :func:`after` checks the built config again. Model
features that cannot be compacted (several KV-cache groups, sliding window, chunked-local
attention, MLA, ALiBi, KV sharing, unwrapped attention backends, split kernel blocks) are refused
by the engine itself at startup (:mod:`vllm_caote.engine.support`), where the KV-cache layout is
known. What scoring cannot read right is refused here: an fp8 KV cache with per-head scales
(scoring dequantises with the one scale vLLM keeps, the heads' maximum) and a multimodal model
while a budgeted prompt may be cut into block-wise chunks (the cut comes after vLLM scheduled the
chunk's encoder inputs, so it could split one).

Prefix caching stays on for every request. A budgeted request *reads* prefix-cache hits: they
stay whole at its head, shared, never scored away or written, and not counted against its
budget (its stats say how many: ``shared_prefix_tokens``). It never *registers* the blocks it
computes, since compaction rewrites them, so unbudgeted requests keep full prefix caching and
are never corrupted (:mod:`vllm_caote.engine.kv_cache_manager`).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.vllm_caote")

SCHEDULER_CLS = "vllm_caote.engine.scheduler.CaoteScheduler"
#: chosen instead when vLLM runs async scheduling (step N+1 scheduled before N's output is seen)
ASYNC_SCHEDULER_CLS = "vllm_caote.engine.async_scheduler.CaoteAsyncScheduler"
#: cache dtypes eviction can score: the model dtype, and fp8 (scored after dequantisation)
SUPPORTED_KV_CACHE_DTYPES = (
    "auto",
    "bfloat16",
    "float16",
    "float32",
    "fp8",
    "fp8_e4m3",
    "fp8_e5m2",
)


class ConfigConflictError(ValueError):
    """An explicit vLLM setting that KV eviction cannot run under; names the flag."""


def _refuse(what: str, fix: str) -> ConfigConflictError:
    return ConfigConflictError(
        f"vllm-caote: {what} is not supported with KV eviction. {fix}, or serve without the "
        "plugin (CAOTE_DISABLE=1)."
    )


def _refuse_parallelism_and_transfer(
    *, pp: int, dcp: int, pcp: int, dbo: bool, ubatch: int, kv_transfer, kv_offloading
) -> None:
    """Settings under which a compaction cannot be honoured, whether on the ``EngineArgs`` (in
    :func:`before`: vLLM rejects some, or resets them on a platform, before :func:`after` runs)
    or on the built config (in :func:`after`)."""
    if pp > 1:
        raise _refuse("--pipeline-parallel-size > 1", "Use tensor parallelism")
    if dcp > 1:
        raise _refuse(
            f"--decode-context-parallel-size {dcp} (decode context parallelism shards each "
            "request's KV cache across ranks; eviction scores and compacts it whole)",
            "Drop the flag (tensor parallelism is supported)",
        )
    if pcp > 1:
        raise _refuse(
            f"--prefill-context-parallel-size {pcp} (prefill context parallelism splits each "
            "request's tokens across ranks; eviction scores and compacts it whole)",
            "Drop the flag (tensor parallelism is supported)",
        )
    if dbo:
        raise _refuse(
            "--enable-dbo (dual-batch overlap runs each step as micro-batches, which the "
            "eviction step does not follow)",
            "Drop the flag",
        )
    if ubatch > 1:
        raise _refuse(
            f"--ubatch-size {ubatch} (micro-batching, which the eviction step does not follow)",
            "Drop the flag",
        )
    if kv_offloading is not None:
        raise _refuse(
            f"--kv-offloading-size {kv_offloading} (KV offloading is a KV connector: it saves "
            "a layer's KV after the layer runs, so compacted blocks would be stored as if whole)",
            "Drop the flag",
        )
    if kv_transfer is not None:
        connector = getattr(kv_transfer, "kv_connector", None)
        if connector is None and isinstance(kv_transfer, dict):
            connector = kv_transfer.get("kv_connector")
        raise _refuse(
            f"--kv-transfer-config (KV connector {connector}: P/D disaggregation, LMCache, "
            "offloading; a connector saves a layer's KV after the layer runs, so compacted "
            "blocks would be stored and loaded as if whole)",
            "Drop the flag",
        )


def _refuse_unreadable(vllm_config, cache_dtype: str) -> None:
    """What scoring cannot read right: per-head fp8 KV scales, and encoder inputs a block-wise
    prefill chunk could split."""
    from vllm_caote.config import settings

    mc = vllm_config.model_config
    if mc is None:
        return
    quant = getattr(mc.hf_config, "quantization_config", None) or {}
    if not isinstance(quant, dict):
        quant = quant.to_dict() if hasattr(quant, "to_dict") else vars(quant)
    scheme = quant.get("kv_cache_scheme") or (quant.get("quantization") or {}).get(
        "kv_cache_scheme"
    )
    strategy = str((scheme or {}).get("strategy", "")).lower() if isinstance(scheme, dict) else ""
    if cache_dtype.startswith("fp8") and strategy == "attn_head":
        raise _refuse(
            f"--kv-cache-dtype {cache_dtype} with this checkpoint's per-head KV-cache scales "
            "(compressed-tensors kv_cache_scheme strategy attn_head: vLLM keeps one scale per "
            "layer, the heads' maximum, so eviction would score every other head's keys and "
            "values on the wrong scale)",
            "Serve the KV cache unquantised (--kv-cache-dtype auto) or a checkpoint with "
            "per-tensor KV scales",
        )
    s = settings(vllm_config)
    if mc.is_multimodal_model and s.prefill_chunk != 0 and s.prefill != "oneshot":
        raise _refuse(
            f"A multimodal model ({', '.join(mc.architectures or [])}) with prefill "
            f"'{s.prefill}' (a budgeted prompt may be cut into block-wise chunks after vLLM "
            "scheduled the chunk's encoder inputs, which could split an image or audio input)",
            'Set --additional-config \'{"kv_eviction": {"prefill": "oneshot"}}\'',
        )


def _refuse_v2_only(features: list[str]) -> None:
    if features:
        raise _refuse(
            f"{', '.join(features)} (served only by vLLM's V2 model runner; eviction hooks V1)",
            "Drop the setting",
        )


def before(args) -> list[str]:
    """Adjust ``EngineArgs`` before vLLM builds its config. Returns what was self-configured."""
    _refuse_parallelism_and_transfer(
        pp=args.pipeline_parallel_size or 1,
        dcp=args.decode_context_parallel_size or 1,
        pcp=args.prefill_context_parallel_size or 1,
        dbo=bool(args.enable_dbo),
        ubatch=args.ubatch_size or 0,
        kv_transfer=args.kv_transfer_config,
        kv_offloading=args.kv_offloading_size,
    )
    notes: list[str] = []
    # async scheduling stays as the user or vLLM set it: after() picks the matching scheduler

    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
        # the engine's runner is chosen on its config in after(), never in the environment
        raise _refuse(
            "VLLM_USE_V2_MODEL_RUNNER=1 (eviction hooks vLLM's V1 model runner)",
            "Unset it",
        )
    from vllm_caote.engine.runner_choice import V2_ONLY_ARGS, v2_only_features

    _refuse_v2_only(v2_only_features(args, V2_ONLY_ARGS))
    # CUDA graphs stay as the user or vLLM set them: FULL is left out per step, only for the
    # steps whose budgeted rows need the attention hook (vllm_caote.engine.graphs)

    if args.scheduler_cls not in (None, SCHEDULER_CLS, ASYNC_SCHEDULER_CLS):
        raise _refuse(
            f"--scheduler-cls {args.scheduler_cls}", "Drop the flag (the plugin sets its own)"
        )
    return notes


def after(vllm_config, notes: list[str]) -> None:
    """Check the built ``VllmConfig`` and select the plugin's scheduler and worker classes."""
    from vllm_caote.config import settings
    from vllm_caote.engine.worker import WORKERS, plugin_worker_for

    pc = vllm_config.parallel_config
    _refuse_parallelism_and_transfer(
        pp=pc.pipeline_parallel_size,
        dcp=pc.decode_context_parallel_size,
        pcp=pc.prefill_context_parallel_size,
        dbo=pc.enable_dbo,
        ubatch=pc.ubatch_size,
        kv_transfer=vllm_config.kv_transfer_config,
        kv_offloading=vllm_config.cache_config.kv_offloading_size,
    )
    if vllm_config.speculative_config is not None:
        raise _refuse("Speculative decoding (--speculative-config)", "Drop the speculative config")
    if vllm_config.model_config is not None and vllm_config.model_config.use_mla:
        raise _refuse(
            "Multi-head latent attention (MLA; this model's KV cache is a latent, not per-head "
            "keys and values)",
            "Serve a non-MLA model",
        )
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise _refuse(
            f"--kv-cache-dtype {cache_dtype}",
            f"Use one of {', '.join(SUPPORTED_KV_CACHE_DTYPES)}",
        )
    _refuse_unreadable(vllm_config, cache_dtype)
    from vllm_caote.engine.runner_choice import choose_v1, v2_only_features

    _refuse_v2_only(v2_only_features(vllm_config))
    if choose_v1(vllm_config):
        notes.append("model runner V1 for this engine (vLLM chose V2; eviction hooks V1)")

    if not str(pc.worker_cls).startswith("vllm_caote."):
        worker = plugin_worker_for(str(pc.worker_cls))
        if worker is None:
            raise _refuse(
                f"--worker-cls {pc.worker_cls}", f"Use a stock worker ({', '.join(WORKERS)})"
            )
        pc.worker_cls = worker
    vllm_config.scheduler_config.scheduler_cls = (
        ASYNC_SCHEDULER_CLS if vllm_config.scheduler_config.async_scheduling else SCHEDULER_CLS
    )

    s = settings(vllm_config)  # a bad --additional-config kv_eviction stops startup here
    logger.info(
        "vllm-caote: KV eviction ready (default budget %s, policy %s, prefill chunk %d); "
        "changed for all traffic: %s; as vLLM set: %s",
        s.default_budget or "none: opt-in per request",
        s.default_policy,
        s.prefill_chunk,
        "; ".join(notes) if notes else "nothing",
        unchanged_settings(vllm_config),
    )


def unchanged_settings(vllm_config) -> str:
    """The settings that cost every request on a GPU, as the engine runs them (the startup
    line: the plugin leaves them as the user or vLLM chose)."""
    cg = vllm_config.compilation_config.cudagraph_mode
    graphs = "none" if cg is None else cg.name
    if cg is not None and cg.has_full_cudagraphs():
        graphs += " (FULL left out only in steps with a budgeted row that needs the hook)"
    async_on = bool(vllm_config.scheduler_config.async_scheduling)
    return f"CUDA graphs {graphs}, async scheduling {'on' if async_on else 'off'}"


def install() -> None:
    """Wrap ``EngineArgs.create_engine_config`` (register: ``vllm_caote.compat.CONTACTS``)."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_caote_wrapped", False):
        return

    def create_engine_config(self, *args, **kwargs):
        notes = before(self)
        vllm_config = original(self, *args, **kwargs)
        after(vllm_config, notes)
        return vllm_config

    create_engine_config._caote_wrapped = True  # type: ignore[attr-defined]
    create_engine_config.__wrapped__ = original  # type: ignore[attr-defined]
    create_engine_config.__doc__ = original.__doc__
    EngineArgs.create_engine_config = create_engine_config
