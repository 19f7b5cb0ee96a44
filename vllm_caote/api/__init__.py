"""OpenAI-server side of vllm-caote: per-request ``kv_budget`` / ``kv_policy`` and stats.

``client.completions.create(..., extra_body={"kv_budget": 2048, "kv_policy": "caote-snapkv"})``
(or the same keys inside ``vllm_xargs``) reaches the engine as
``SamplingParams.extra_args["kv_budget"]`` / ``["kv_policy"]``; responses of budgeted
requests carry a top-level ``"kv_eviction"`` object; ``GET /v1/kv_eviction/policies``
describes what the server accepts. See :mod:`vllm_caote.api.server` for the vLLM hook and
:mod:`vllm_caote.api.params` for the validation rules (:mod:`vllm_caote.api.middleware` applies
them; :mod:`vllm_caote.api.state` holds what the two share).
"""

from __future__ import annotations

from vllm_caote.config import STATS_KEY

from .params import EvictionParamError, Limits, check_budget, check_policy, resolve, rewrite
from .server import POLICIES_PATH, install, is_api_server_process

__all__ = [
    "POLICIES_PATH",
    "STATS_KEY",
    "EvictionParamError",
    "Limits",
    "check_budget",
    "check_policy",
    "install",
    "is_api_server_process",
    "resolve",
    "rewrite",
]
