"""One validator for ``kv_budget`` / ``kv_policy``, used by the HTTP layer and the engine front-end."""

from __future__ import annotations

from typing import Any

from vllm_caote.config import BUDGET_KEY, POLICY_KEY, EvictionSettings, settings
from vllm_caote.scoring import get_policy, policy_names

try:  # vLLM maps VLLMValidationError to HTTP 400 with `param`; offline users get a ValueError.
    from vllm.exceptions import VLLMValidationError as _Base
except Exception:  # pragma: no cover - vLLM always present in the product
    _Base = Exception  # type: ignore[assignment,misc]


class EvictionArgsError(_Base, ValueError):  # type: ignore[misc]
    """A bad ``kv_budget`` or ``kv_policy``; ``parameter`` names the field."""

    def __init__(self, message: str, parameter: str, value: Any = None) -> None:
        try:
            super().__init__(message, parameter=parameter, value=value)
        except TypeError:  # plain Exception base
            Exception.__init__(self, message)
        self.parameter = parameter
        self.message = message

    def __str__(self) -> str:
        return self.message


def resolve(
    extra_args: dict[str, Any] | None,
    block_size: int,
    max_model_len: int,
    cfg: EvictionSettings | None = None,
) -> tuple[int, str] | None:
    """Validate and resolve a request's eviction arguments against the server defaults.

    Returns ``(budget, policy)`` when the request is evicted, ``None`` when it runs as stock
    vLLM (no budget and no default, or ``kv_budget == 0``). Raises :class:`EvictionArgsError`.
    """
    cfg = cfg or settings()
    args = extra_args or {}
    budget = args.get(BUDGET_KEY, None)
    policy = args.get(POLICY_KEY, None)
    if budget is None:
        budget = cfg.default_budget
    lo = cfg.min_budget(block_size)
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise EvictionArgsError(
            f"{BUDGET_KEY} must be an integer number of tokens: 0 (no eviction) or "
            f"{lo}..{max_model_len}; got {budget!r}",
            BUDGET_KEY,
            budget,
        )
    if policy is not None and not isinstance(policy, str):
        raise EvictionArgsError(
            f"{POLICY_KEY} must be a string, one of: {', '.join(policy_names())}; "
            f"got {policy!r}",
            POLICY_KEY,
            policy,
        )
    if policy is not None:
        try:
            policy = get_policy(policy).name
        except ValueError:
            raise EvictionArgsError(
                f"{POLICY_KEY} {policy!r} is unknown; valid policies: {', '.join(policy_names())}",
                POLICY_KEY,
                policy,
            ) from None
    if budget == 0:
        return None
    if budget < 0:
        raise EvictionArgsError(
            f"{BUDGET_KEY} must be >= 0 (0 turns eviction off); got {budget}", BUDGET_KEY, budget
        )
    if budget < lo:
        raise EvictionArgsError(
            f"{BUDGET_KEY} must be at least {lo} tokens (sinks {cfg.sink_tokens} + observation "
            f"window {cfg.window} + one block of {block_size}), or 0 to turn eviction off; "
            f"got {budget}",
            BUDGET_KEY,
            budget,
        )
    if budget > max_model_len:
        raise EvictionArgsError(
            f"{BUDGET_KEY} must be at most max_model_len ({max_model_len}); got {budget}",
            BUDGET_KEY,
            budget,
        )
    return budget, policy or cfg.default_policy
