"""Settings shared by the API front-end and the engine, read from the environment.

Every vLLM process (API server, engine core, workers) inherits the same environment, so these
values agree everywhere without being shipped through vLLM's config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vllm_caote.scoring import DEFAULT_POLICY, get_policy

# Keys inside SamplingParams.extra_args (what the OpenAI server fills from `vllm_xargs`).
BUDGET_KEY = "kv_budget"
POLICY_KEY = "kv_policy"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from e


@dataclass(frozen=True)
class EvictionSettings:
    """Server-wide knobs. ``default_budget == 0`` means no eviction unless a request asks."""

    default_budget: int
    default_policy: str
    sink_tokens: int  # never evicted: the first tokens of the sequence (attention sinks)
    window: int  # observation window: the last queries scored against, never evicted
    prefill_chunk: int  # block-wise prefill chunk, in tokens (0 = evict once after the prompt)

    def min_budget(self, block_size: int) -> int:
        """Smallest sensible budget: sinks + observation window + one block."""
        return self.sink_tokens + self.window + block_size


def settings() -> EvictionSettings:
    policy = os.environ.get("VLLM_CAOTE_DEFAULT_POLICY", "").strip() or DEFAULT_POLICY
    get_policy(policy)  # fail fast on a bad server default
    s = EvictionSettings(
        default_budget=_env_int("VLLM_CAOTE_DEFAULT_BUDGET", 0),
        default_policy=policy,
        sink_tokens=_env_int("VLLM_CAOTE_SINKS", 4),
        window=_env_int("VLLM_CAOTE_WINDOW", 32),
        prefill_chunk=_env_int("VLLM_CAOTE_PREFILL_CHUNK", 512),
    )
    for name in ("default_budget", "sink_tokens", "window", "prefill_chunk"):
        if getattr(s, name) < 0:
            raise ValueError(f"VLLM_CAOTE_{name.upper()} must be >= 0")
    if s.window < 1:
        raise ValueError("VLLM_CAOTE_WINDOW must be >= 1")
    return s
