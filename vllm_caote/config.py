"""Server-wide eviction settings, read through vLLM's own configuration.

Where a value comes from, first match wins:

1. ``--additional-config '{"kv_eviction": {"default_budget": 1024, ...}}'`` (``vllm serve
   --help`` lists ``--additional-config``; ``LLM(additional_config=...)`` offline). It travels
   inside ``VllmConfig`` to every vLLM process, so the API server, the engine core and the
   workers agree on it.
2. ``CAOTE_<KEY>`` environment variables (``CAOTE_DEFAULT_BUDGET=1024``): a fallback for
   deployments that configure through the environment. They are not ``VLLM_*`` names, so vLLM
   does not warn about unknown variables.
3. The defaults below. ``default_budget`` is 0: eviction is lossy, so it is opt-in per request
   unless the operator sets a default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from vllm_caote.scoring import DEFAULT_POLICY, get_policy

# Keys inside SamplingParams.extra_args (what the OpenAI server fills from `vllm_xargs`).
BUDGET_KEY = "kv_budget"
POLICY_KEY = "kv_policy"
#: per-request ``recent`` (share of the budget kept as the newest tokens)
RECENT_KEY = "kv_recent"
#: the request keys this plugin reads (and strips before vLLM sees the body)
REQUEST_KEYS = (BUDGET_KEY, POLICY_KEY, RECENT_KEY)
#: per-request statistics of a finished budgeted request, in ``kv_transfer_params`` and in
#: the OpenAI response body
STATS_KEY = "kv_eviction"
#: the section of ``--additional-config`` this plugin reads
CONFIG_SECTION = "kv_eviction"
ENV_PREFIX = "CAOTE_"
PREFILL_MODES = ("adaptive", "blockwise", "oneshot")
#: ``prefill_base`` values: the base score of evictions made before the prompt's end
PREFILL_BASES = ("own", "keydiff")
#: default ``recent``: the protected recent window as a share of the budget (docs/results.md)
RECENT_DEFAULT = 0.0


class SettingsError(ValueError):
    """A bad ``kv_eviction`` setting; the message names where it came from."""


@dataclass(frozen=True)
class EvictionSettings:
    """Server-wide knobs. ``default_budget == 0`` means no eviction unless a request asks."""

    default_budget: int = 0
    default_policy: str = DEFAULT_POLICY
    sinks: int = 4  # never evicted: the first tokens of the sequence (attention sinks)
    window: int = 32  # observation window: the last queries scored against, never evicted
    # share of the budget kept as the newest tokens whatever the policy scores (at least
    # `window`; scoring.recent_window): language modelling reads the newest tokens most
    recent: float = RECENT_DEFAULT
    # how a budgeted prompt is processed: "adaptive" (whole prompt while the pool has room,
    # block-wise under memory pressure), "blockwise" (always chunks) or "oneshot"
    prefill: str = "adaptive"
    # block-wise prefill chunk in tokens (0 = "oneshot", whatever `prefill` says)
    prefill_chunk: int = 512
    # adaptive prefill under memory pressure: seconds a budgeted prompt may wait for another
    # budgeted prompt's whole-prompt prefill to end (and shrink to its budget) before it goes
    # block-wise; 0 = never wait
    prefill_wait: int = 60
    # base score of a query-aware policy (SnapKV, TOVA and their CAOTE forms) for evictions
    # made before the prompt's last token is read (block-wise chunks): the window then holds
    # text, not the question. "keydiff" keeps the policy's meta-score over that query-agnostic
    # base (caote-snapkv -> caote-keydiff); "own" keeps the policy.
    # The eviction after the last prompt token always uses the policy itself.
    prefill_base: str = "own"
    # decode: a budgeted request grows to its budget plus this many tokens (rounded up to whole
    # blocks, at least one) and then evicts back to its budget: one eviction per `slack` tokens
    eviction_slack: int = 128
    # a finished budgeted request's compacted cache stays in vLLM's pool as cached free blocks,
    # and the next turn of its conversation resumes from it (engine/sessions.py); 0 = off
    keep_sessions: int = 1
    # a preempted budgeted request's compacted cache stays in vLLM's pool as cached free blocks,
    # and it resumes from what is left of it when rescheduled (engine/preemption.py); needs
    # keep_sessions; 0 = off (recomputed from token 0, as stock vLLM)
    keep_preempted: int = 1

    def min_budget(self, block_size: int) -> int:
        """Smallest sensible budget: sinks + observation window + one block."""
        return self.sinks + self.window + block_size


def _as_int(name: str, raw: Any, source: str) -> int:
    if isinstance(raw, bool):
        raise SettingsError(f"{source} {name} must be an integer, got {raw!r}")
    try:
        return int(str(raw).strip()) if isinstance(raw, str) else int(raw)
    except (TypeError, ValueError):
        raise SettingsError(f"{source} {name} must be an integer, got {raw!r}") from None


def _as_fraction(name: str, raw: Any, source: str) -> float:
    try:
        value = float(str(raw).strip()) if isinstance(raw, str) else float(raw)
    except (TypeError, ValueError):
        raise SettingsError(f"{source} {name} must be a number, got {raw!r}") from None
    if isinstance(raw, bool) or not 0.0 <= value <= 1.0:
        raise SettingsError(f"{source} {name} must be a fraction in [0, 1], got {raw!r}")
    return value


def settings(vllm_config: Any = None) -> EvictionSettings:
    """The settings in force for ``vllm_config`` (or the environment alone when None)."""
    section: dict[str, Any] = {}
    if vllm_config is not None:
        extra = getattr(vllm_config, "additional_config", None) or {}
        section = dict(extra.get(CONFIG_SECTION) or {})
    names = {f.name for f in fields(EvictionSettings)}
    unknown = sorted(set(section) - names)
    if unknown:
        raise SettingsError(
            f"--additional-config {CONFIG_SECTION}: unknown key(s) {unknown}; "
            f"valid keys: {sorted(names)}"
        )
    values: dict[str, Any] = {}
    for name in names:
        env = ENV_PREFIX + name.upper()
        if name in section:
            raw, source = section[name], f"--additional-config {CONFIG_SECTION}."
        elif os.environ.get(env, "").strip():
            raw, source = os.environ[env], f"environment {env}="
        else:
            continue
        if name == "prefill":
            values[name] = str(raw).strip().lower()
            if values[name] not in PREFILL_MODES:
                raise SettingsError(f"{source}prefill must be one of {PREFILL_MODES}, got {raw!r}")
        elif name == "prefill_base":
            values[name] = str(raw).strip().lower()
            if values[name] not in PREFILL_BASES:
                raise SettingsError(
                    f"{source}prefill_base must be one of {PREFILL_BASES}, got {raw!r}"
                )
        elif name == "recent":
            values[name] = _as_fraction(name, raw, source.rstrip("=."))
        elif name == "default_policy":
            try:
                values[name] = get_policy(str(raw)).name
            except ValueError as e:
                raise SettingsError(f"{source}default_policy: {e}") from None
        else:
            values[name] = _as_int(name, raw, source.rstrip("=."))
    s = EvictionSettings(**values)
    for name in (
        "default_budget",
        "sinks",
        "prefill_chunk",
        "prefill_wait",
        "eviction_slack",
        "keep_sessions",
        "keep_preempted",
    ):
        if getattr(s, name) < 0:
            raise SettingsError(f"kv_eviction setting {name} must be >= 0, got {getattr(s, name)}")
    if s.window < 1:
        raise SettingsError(f"kv_eviction setting window must be >= 1, got {s.window}")
    return s
