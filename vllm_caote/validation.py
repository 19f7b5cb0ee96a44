"""Engine-side validation of ``SamplingParams.extra_args`` (offline ``vllm.LLM`` and any client
that bypasses the HTTP layer). The rules are the HTTP layer's, :mod:`vllm_caote.api.params`."""

from __future__ import annotations

from typing import Any

from vllm_caote.api.params import EvictionParamError, Limits, check_budget, check_policy
from vllm_caote.config import BUDGET_KEY, POLICY_KEY, EvictionSettings, settings
from vllm_caote.scoring import policy_names

try:  # vLLM maps VLLMValidationError to HTTP 400 with `param`; offline users get a ValueError.
    from vllm.exceptions import VLLMValidationError as _Base
except Exception:  # pragma: no cover - vLLM always present in the product
    _Base = Exception  # type: ignore[assignment,misc]


class EvictionArgsError(_Base, ValueError):  # type: ignore[misc]
    """A bad ``kv_budget`` or ``kv_policy``; ``parameter`` names the field."""

    def __init__(self, message: str, parameter: str) -> None:
        try:
            super().__init__(message, parameter=parameter)
        except TypeError:  # plain Exception base
            Exception.__init__(self, message)
        self.parameter = parameter
        self.message = message

    def __str__(self) -> str:
        return self.message


def limits(block_size: int, max_model_len: int, cfg: EvictionSettings | None = None) -> Limits:
    cfg = cfg or settings()
    return Limits(
        cfg.min_budget(block_size),
        max_model_len,
        cfg.default_budget,
        cfg.default_policy,
        tuple(policy_names()),
    )


def resolve(
    extra_args: dict[str, Any] | None,
    block_size: int,
    max_model_len: int,
    cfg: EvictionSettings | None = None,
) -> tuple[int, str] | None:
    """``(budget, policy)`` when the request is evicted, ``None`` when it runs as stock vLLM
    (no budget and no default, or ``kv_budget == 0``). Raises :class:`EvictionArgsError`."""
    lim = limits(block_size, max_model_len, cfg)
    args = extra_args or {}
    try:
        budget = args.get(BUDGET_KEY)
        budget = lim.default_budget if budget is None else check_budget(budget, BUDGET_KEY, lim)
        policy = args.get(POLICY_KEY)
        policy = (
            lim.default_policy if policy is None else check_policy(policy, POLICY_KEY, lim.policies)
        )
    except EvictionParamError as e:
        raise EvictionArgsError(str(e), e.param) from None
    return None if budget == 0 else (budget, policy)
