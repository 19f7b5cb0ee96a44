"""The register: every contact of vllm-caote with vLLM internals, one :class:`Contact` each.

Each row says which vLLM symbol the plugin touches, how, why, what the supported alternative is
(or why there is none in vLLM 0.32) and when the contact can go. Where vLLM offers a class hook,
the plugin uses a subclass chosen through vLLM's own config (``scheduler_cls``, ``worker_cls``,
the attention-backend registry, the stat-logger plugin group); the remaining patches are the
rows whose ``how`` is ``"patch"``. :mod:`vllm_caote.compat` checks every row at startup;
docs/vllm-integration.md is generated from it (``python -m vllm_caote.compat``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Contact:
    symbol: str  # "module:Qualified.name"; "a:X|b:X" where vLLM releases differ (either)
    how: str  # "subclass" | "override" (in a subclass) | "patch" | "class swap" | "api"
    why: str
    alternative: str  # the supported way, or why vLLM 0.32 has none
    removal: str  # when this contact can go
    params: tuple[str, ...] | None = None  # leading parameter names (after self) we rely on


_SCHED = "vllm.v1.core.sched.scheduler:Scheduler"
_ASYNC_SCHED = "vllm.v1.core.sched.async_scheduler:AsyncScheduler"
_COORD = "vllm.v1.core.kv_cache_coordinator:KVCacheCoordinator"
_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"

CONTACTS: tuple[Contact, ...] = (
    Contact(
        "vllm.engine.arg_utils:EngineArgs.create_engine_config",
        "patch",
        "The one point every entry point (vllm serve, api_server, LLM) passes before the engine "
        "starts: selects the plugin's scheduler and worker classes, gives the engine's config "
        "the V1 runner (engine/runner_choice.py) and refuses explicit conflicting flags "
        "(vllm_caote.configure). CUDA graphs and async scheduling stay as vLLM set them.",
        "A platform plugin's check_and_update_config would replace vLLM's CPU/CUDA platform; "
        "users passing --scheduler-cls/--worker-cls/--no-async-scheduling by hand is the "
        "supported path, but then a forgotten flag silently disables budgets.",
        "When vLLM gives general plugins a config hook (or scheduler/worker class plugins).",
        ("usage_context", "headless"),
    ),
    Contact(
        _SCHED,
        "subclass",
        "CaoteScheduler: eviction decisions, block release after confirmed compaction, stats.",
        "Selected with scheduler_config.scheduler_cls, vLLM's own hook.",
        "Stays (supported hook); the overrides below are what can break.",
    ),
    Contact(
        f"{_SCHED}.add_request",
        "override",
        "Read kv_budget of a new request; a streaming-input session's next input restarts a "
        "session whose eviction failed between turns (engine/fallback.py).",
        "Public method.",
        "Stays.",
        ("request",),
    ),
    Contact(
        f"{_SCHED}.schedule",
        "override",
        "Ship each step's eviction plan to the workers.",
        "The KV-connector metadata channel would do it, but vLLM has one connector slot, "
        "which users need for LMCache / NIXL / P-D disaggregation.",
        "Stays.",
        ("throttle_prefills",),
    ),
    Contact(
        f"{_SCHED}.update_from_output",
        "override",
        "Free blocks of confirmed compactions; recompute requests whose eviction failed.",
        "Public method.",
        "Stays.",
        ("scheduler_output", "model_runner_output"),
    ),
    Contact(
        f"{_SCHED}._reserve_prefill_lookahead",
        "override",
        "Block-wise prefill: the last per-request cut of a chunk's size in schedule() "
        "(vLLM uses it for MTP lookahead). long_prefill_token_threshold is ignored when only "
        "one request is running, so it cannot bound a budgeted request's chunk.",
        "None in vLLM 0.32: no per-request chunk-size hook.",
        "When vLLM lets a request cap its own prefill chunk.",
        ("request", "num_computed_tokens", "num_new_tokens"),
    ),
    Contact(
        f"{_SCHED}._preempt_request",
        "override",
        "A preempted request restarts from token 0: its evicted count resets and its generation "
        "is bumped; first, a budgeted one's compacted cache is kept (engine/preemption.py), "
        "read from its block list and num_computed_tokens before vLLM frees them. A request whose eviction failed is preempted with drop_stale_output=True "
        "(async: the step scheduled since ran on the unconfirmed cache).",
        "None: no preemption callback.",
        "When vLLM adds a preemption hook.",
        ("request", "timestamp", "drop_stale_output"),
    ),
    Contact(
        _ASYNC_SCHED,
        "subclass",
        "CaoteAsyncScheduler (engine/async_scheduler.py): the same eviction (a mixin) when "
        "async scheduling is on.",
        "Selected with scheduler_config.scheduler_cls, vLLM's own hook.",
        "Stays (supported hook).",
    ),
    Contact(
        f"{_ASYNC_SCHED}.schedule",
        "override",
        "After vLLM's schedule and the plan: cut a planned eviction's tail blocks from the "
        "request's list, so the next step (scheduled before this one's output is seen) is sized "
        "on the compacted cache; the tail goes back once no step in flight may write it.",
        "None: SchedulerOutput only ever appends blocks to a running request.",
        "With native token dropping in vLLM.",
        ("throttle_prefills",),
    ),
    Contact(
        f"{_ASYNC_SCHED}.reset_prefix_cache",
        "override",
        "With reset_running_requests the reset needs every block free: the blocks the async "
        "scheduler's fences hold go back at once, as stock async vLLM frees them.",
        "Public method.",
        "Stays.",
        ("reset_running_requests", "reset_connector"),
    ),
    Contact(
        f"{_SCHED}._drain_deferred_frees",
        "api",
        "The async scheduler sets defer_block_free and fences cut tail blocks on the same "
        "sched_step_seq / processed_step_seq counters (instance attributes set in "
        "Scheduler.__init__; update_from_output advances processed_step_seq).",
        "None: deferred frees are internal (vLLM uses them for KV-consumer connectors).",
        "When vLLM exposes a block-release API with an in-flight fence.",
    ),
    Contact(
        f"{_SCHED}._free_request_blocks",
        "api",
        "A streaming-input session whose eviction failed as its turn ended is alive but not "
        "running: its blocks are freed (after a step in flight) and it restarts from token 0 "
        "(engine/fallback.py; it moves from kv_holding_waiting to waiting, and is listed in "
        "reset_preempted_req_ids so the worker drops its eviction state).",
        "None: vLLM preempts only running requests.",
        "When vLLM can reset a waiting request.",
        ("request",),
    ),
    Contact(
        f"{_SCHED}._free_request",
        "override",
        "Per-request stats into kv_transfer_params (tuple return relied on).",
        "A KV connector's request_finished returns the same dict, but takes the single "
        "connector slot.",
        "When vLLM has per-request output metadata for plugins.",
        ("request", "delay_free_blocks"),
    ),
    Contact(
        f"{_SCHED}.make_stats",
        "override",
        "vllm_caote:* metrics payload.",
        "Public method.",
        "Stays.",
    ),
    Contact(
        "vllm.v1.core.kv_cache_manager:KVCacheManager",
        "class swap",
        "The scheduler's own manager instance gets num_held_blocks()/trim()/detach(), the "
        "interface the scheduler uses to give evicted blocks back (engine/kv_cache_manager.py).",
        "None: Scheduler.__init__ builds KVCacheManager itself, no config selects the class.",
        "When vLLM exposes a block-release API or a manager-class hook.",
    ),
    Contact(
        f"{_COORD}.get_num_blocks_to_allocate",
        "override",
        "Budgeted requests need blocks for their compacted cache, not their history.",
        "None (class swap of the scheduler's coordinator instance).",
        "With a manager-class hook or native token dropping in vLLM.",
        (
            "request_id",
            "num_tokens",
            "new_computed_blocks",
            "num_encoder_tokens",
            "total_computed_tokens",
            "num_local_computed_tokens",
            "num_tokens_main_model",
            "apply_admission_cap",
        ),
    ),
    Contact(
        f"{_COORD}.allocate_new_blocks",
        "override",
        "As above.",
        "As above.",
        "As above.",
        ("request_id", "num_tokens", "num_tokens_main_model"),
    ),
    Contact(
        f"{_COORD}.cache_blocks",
        "override",
        "Compacted blocks are never registered in the prefix cache (prefix-cache isolation).",
        "SamplingParams.skip_reading_prefix_cache covers reads only; there is no per-request "
        "'do not cache' flag.",
        "When vLLM has a per-request no-write flag.",
        ("request", "num_computed_tokens"),
    ),
    Contact(
        "vllm.v1.core.kv_cache_manager:KVCacheManager.get_computed_blocks",
        "override",
        "Kept conversation caches (engine/sessions.py): a budgeted request whose prompt "
        "continues a finished budgeted request's tokens gets that request's compacted blocks "
        "and its true length as its prefix hit; every other request gets vLLM's own lookup.",
        "None: vLLM's prefix cache matches true-token hashes only; a compacted cache has none "
        "(vLLM PR #53876, bounded sessions, is open).",
        "When vLLM can resume a request from a compacted cache (bounded sessions).",
        ("request",),
    ),
    Contact(
        f"{_COORD}.allocate_new_computed_blocks",
        "override",
        "A resuming request's computed tokens are seen as its kept blocks, whole (its partial "
        "last block is its own: no copy-on-write); once vLLM has taken them, their session "
        "hashes are removed so no other request can match them.",
        "As for get_computed_blocks.",
        "As above.",
        ("request_id", "new_computed_blocks", "num_local_computed_tokens"),
    ),
    Contact(
        "vllm.v1.core.block_pool:BlockPool._insert_block_hash",
        "api",
        "A finished budgeted request's compacted blocks are registered under session hashes "
        "(never true-token ones) before vLLM frees them, so they stay cached free blocks, "
        "reclaimed least recently used first; BlockPool.evict_blocks removes the hashes when "
        "a request takes them or they go stale.",
        "BlockPool.cache_full_blocks hashes a request's true tokens only.",
        "When vLLM has a public way to cache a block under a caller's hash (bounded sessions).",
        ("block_hash_with_group_id", "block", "num_tokens"),
    ),
    Contact(
        "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager",
        "api",
        "trim()/detach() shorten req_to_blocks / num_cached_block of a budgeted request; the "
        "tail goes back through BlockPool.free_blocks (detach: once no step in flight may "
        "write it).",
        "None: no public API to drop a request's tail blocks.",
        "When vLLM exposes a block-release API.",
    ),
    Contact(
        "vllm.v1.worker.gpu_worker:Worker._make_model_runner",
        "override",
        "CaoteGPUWorker builds the V1 runner with the eviction mixin.",
        "This is vLLM's hook for choosing the runner class (worker_cls selects the worker).",
        "Stays.",
        (),
    ),
    Contact(
        "vllm.v1.worker.cpu_worker:CPUWorker.init_device",
        "override",
        "CaoteCPUWorker gives the CPUModelRunner it built the eviction mixin.",
        "None: CPUWorker builds its runner inline, without _make_model_runner.",
        "When CPUWorker uses _make_model_runner.",
        (),
    ),
    Contact(
        f"{_RUNNER}._update_states",
        "override",
        "Drop worker state of finished requests.",
        "None: no per-step plugin hook in the runner.",
        "With a runner hook API.",
        ("scheduler_output",),
    ),
    Contact(
        f"{_RUNNER}._prepare_inputs",
        "override",
        "Slots and seq_lens count the compacted cache while positions stay true.",
        "None.",
        "With native token dropping in vLLM.",
        ("scheduler_output", "num_scheduled_tokens"),
    ),
    Contact(
        f"{_RUNNER}.execute_model",
        "override",
        "Per-step eviction context around the forward pass; confirm compactions.",
        "Public method.",
        "Stays.",
        ("scheduler_output", "intermediate_tensors"),
    ),
    Contact(
        f"{_RUNNER}.sample_tokens",
        "override",
        "The compaction report and timings ride on the step's ModelRunnerOutput.",
        "Public method.",
        "Stays.",
        ("grammar_output",),
    ),
    Contact(
        f"{_RUNNER}.initialize_kv_cache",
        "override",
        "Refuse at startup layers eviction cannot compact (ALiBi, KV sharing, unwrapped backends).",
        "Public method.",
        "Stays.",
        ("kv_cache_config",),
    ),
    Contact(
        "vllm.v1.cudagraph_dispatcher:CudagraphDispatcher.dispatch",
        "class swap",
        "Each runner's dispatcher instance leaves FULL out (invalid_modes, as vLLM does for "
        "encoder-decoder steps) only for steps in which a budgeted row needs the attention "
        "hook, which a replayed FULL graph never calls (engine/graphs.py). Relies on "
        "GPUModelRunner.execute_model calling _prepare_inputs before "
        "_determine_batch_execution_and_padding (tests/engine/test_graphs.py checks it per step).",
        "None in vLLM 0.32: no per-step graph-mode hook; the runner builds its dispatcher inline.",
        "When attention plugins can declare per-step graph needs, or the hook's work is "
        "captured in the graph.",
        (
            "num_tokens",
            "uniform_decode",
            "has_lora",
            "num_active_loras",
            "valid_modes",
            "invalid_modes",
        ),
    ),
    Contact(
        "vllm.forward_context:ForwardContext",
        "api",
        "The hook reads cudagraph_runtime_mode: under FULL it does nothing, as under replay, so "
        "a missed hook is caught and the row falls back (engine/graphs.py).",
        "Public dataclass.",
        "Stays.",
    ),
    Contact(
        "vllm.config:VllmConfig.use_v2_model_runner",
        "class swap",
        "One engine's config gets a subclass whose use_v2_model_runner is False: every vLLM "
        "process reads the runner choice from the config it was handed, and eviction hooks the "
        "V1 runner (engine/runner_choice.py). No write to the process environment.",
        "VLLM_USE_V2_MODEL_RUNNER=0, process-wide and inherited by every child process.",
        "When the plugin hooks the V2 runner (docs/architecture.md, 'The V2 runner').",
    ),
    Contact(
        "vllm.config:VllmConfig._validate_v1_model_runner",
        "api",
        "vLLM's own V1 checks, run again after the runner choice changes.",
        "None: the config validates in __post_init__ for the runner it chose then.",
        "With the class swap above.",
        (),
    ),
    Contact(
        "vllm.v1.worker.block_table:MultiGroupBlockTable.compute_slot_mapping",
        "api",
        "Recompute slots from compacted positions.",
        "None.",
        "With native token dropping.",
        ("num_reqs", "query_start_loc", "positions"),
    ),
    Contact(
        "vllm.v1.worker.gpu_input_batch:CachedRequestState",
        "api",
        "After a confirmed compaction the runner's own block list of the request (its "
        "block_ids field; and the "
        "persistent batch's row, BlockTable.num_blocks_per_row) drops the blocks the scheduler "
        "frees: vLLM rebuilds the row from this list when a running request is left out of a "
        "step, and the request would otherwise write into blocks other requests now own "
        "(engine/step.py, WorkerEviction._trim_blocks).",
        "None: SchedulerOutput only ever appends blocks to a running request (new_block_ids).",
        "When the scheduler output can shrink a request's block list.",
    ),
    Contact(
        "vllm.v1.attention.backends.registry:register_backend",
        "api",
        "CPU_ATTN / FLASH_ATTN / TRITON_ATTN are registered as subclasses whose forward scores "
        "and compacts after the stock kernel (engine/attention.py).",
        "This is vLLM's attention-backend plugin API.",
        "Stays.",
        ("backend", "class_path"),
    ),
    Contact(
        "vllm._custom_ops:cpu_attn_reshape_and_cache",
        "api",
        "Probe CPU_ATTN's in-block packing once per configuration.",
        "None: the packing is a kernel detail.",
        "Stays while CPU_ATTN packs per ISA.",
    ),
    Contact(
        "vllm.v1.engine.input_processor:InputProcessor.process_inputs",
        "patch",
        "Validate kv_budget/kv_policy/kv_recent for offline LLM and any non-HTTP client (HTTP requests "
        "are validated by the middleware first) with the engine's block size and max_model_len.",
        "A logits processor's validate_params sees no engine config and would add a no-op "
        "processor to every batch.",
        "When validate_params receives the engine config.",
        ("request_id", "prompt", "params"),
    ),
    Contact(
        "vllm.v1.engine.output_processor:RequestState.make_request_output",
        "patch",
        "With n > 1 a non-streamed RequestOutput keeps only the last finished choice's "
        "kv_transfer_params; the patch keeps every choice's kv_eviction stats on the parent and "
        "hands the list to the final output (engine/output_processor.py).",
        "None in vLLM 0.32: CompletionOutput has no per-choice extension field.",
        "When per-choice kv_transfer_params (or a per-output extension field) exist.",
        ("new_token_ids", "pooling_output", "finish_reason", "stop_reason", "kv_transfer_params"),
    ),
    Contact(
        "vllm.entrypoints.launchers.app:build_app",
        "patch",
        "Adds the kv_budget middleware (400s, defaults, kv_eviction in responses) and "
        "GET /v1/kv_eviction/policies to vLLM's own app (api/server.py).",
        "vllm.endpoint_plugins load only when named in VLLM_PLUGINS, so they would need a "
        "non-stock launch setting; they also cannot rewrite bodies or responses.",
        "When endpoint plugins load by default and can wrap requests.",
        ("args", "supported_tasks", "model_config"),
    ),
    Contact(
        "vllm.v1.metrics.loggers:AggregateStatLoggerBase",
        "subclass",
        "vllm_caote:* Prometheus metrics (metrics/logger.py).",
        "Loaded through vLLM's vllm.stat_logger_plugins group, before vLLM's own loggers.",
        "Stays.",
    ),
)
