"""Validate and resolve the per-request eviction parameters of an OpenAI request body.

The one vocabulary of request parameters, shared by the HTTP layer and the engine: pure
functions, unit-tested without a server. The server middleware (:mod:`vllm_caote.api.server`)
calls :func:`resolve` on the parsed JSON body of ``/v1/completions``, ``/v1/chat/completions``
and ``/v1/responses`` and forwards the result through ``vllm_xargs`` (which vLLM copies into
``SamplingParams.extra_args``); the engine (:mod:`vllm_caote.engine.input_processor`) calls
the same :func:`resolve` on ``extra_args`` with :meth:`Limits.for_engine`'s limits, which carry
no default budget (the server default is applied by the HTTP layer only).

Rules:

* ``kv_budget`` (int tokens) and ``kv_policy`` (str) may be given top-level or inside
  ``vllm_xargs``; giving both with different values is an error. ``null`` means "not given".
* A request's own value wins over the server defaults (``kv_eviction.default_budget`` /
  ``default_policy``); ``kv_budget: 0`` turns eviction off for that request.
* The budget must be 0 or an integer in ``[min_budget(block_size), max_model_len]``; bools,
  floats (even ``2048.0``) and strings are rejected. The policy must name a registered policy.
* ``kv_recent`` (a number in [0, 1], the request's ``kv_eviction.recent``: the share of the
  budget kept as the newest tokens whatever the policy scores) goes with a budget; without
  one it is an error (nothing would be evicted), as is any value outside [0, 1] or a bool.
* No budget from the request and no server default: nothing is forwarded (stock vLLM).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vllm_caote.config import BUDGET_KEY, POLICY_KEY, RECENT_KEY, REQUEST_KEYS

XARGS_KEY = "vllm_xargs"
_MISSING = object()
_MAX_SHOWN = 60


try:  # vLLM maps VLLMValidationError to HTTP 400 naming `parameter`; offline: a ValueError
    from vllm.exceptions import VLLMValidationError as _Base
except ImportError:  # pragma: no cover - unit tests of this module without vLLM
    _Base = ValueError  # type: ignore[assignment,misc]


class EvictionParamError(_Base, ValueError):  # type: ignore[misc]
    """A bad ``kv_budget`` / ``kv_policy``; ``param`` names the offending field."""

    def __init__(self, message: str, param: str) -> None:
        try:
            super().__init__(message, parameter=param)
        except TypeError:  # plain ValueError base
            ValueError.__init__(self, message)
        self.param = param
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Limits:
    """What the running server allows; built once at start-up."""

    min_budget: int
    max_budget: int  # max_model_len
    default_budget: int
    default_policy: str
    policies: tuple[str, ...]

    @classmethod
    def for_engine(cls, block_size: int, max_model_len: int, s, with_default: bool = True):
        """The limits of an engine with ``block_size`` / ``max_model_len`` and settings ``s``
        (:class:`vllm_caote.config.EvictionSettings`)."""
        from vllm_caote.scoring import policy_names

        return cls(
            min_budget=s.min_budget(block_size),
            max_budget=max_model_len,
            default_budget=s.default_budget if with_default else 0,
            default_policy=s.default_policy,
            policies=tuple(policy_names()),
        )

    def range_text(self) -> str:
        if self.min_budget > self.max_budget:
            return "0 (eviction off); this server's max_model_len is below the minimum budget"
        return f"0 (eviction off) or an integer in [{self.min_budget}, {self.max_budget}]"


def _shown(value: Any) -> str:
    """A short, safe rendering of a client value for an error message."""
    try:
        text = repr(value)
    except ValueError:  # an int past sys.get_int_max_str_digits()
        return f"an integer of about {value.bit_length() * 0.30103:.0f} digits"
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "...(truncated)"


def _describe(value: Any) -> str:
    """The JSON type and a short rendering of a client value, e.g. ``number 1.5``."""
    if value is True or value is False:
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, list):
        return f"array of {len(value)} items"
    if isinstance(value, dict):
        return f"object with {len(value)} keys"
    if isinstance(value, int):
        return f"integer {_shown(value)}"
    if isinstance(value, float):
        return f"number {_shown(value)}"
    if isinstance(value, str):
        return f"string {_shown(value)}"
    return f"{type(value).__name__} {_shown(value)}"


def _pick(body: Mapping[str, Any], key: str) -> tuple[Any, str]:
    """The value of ``key`` from the top level or ``vllm_xargs`` and the name to report."""
    top = body.get(key, _MISSING)
    xargs = body.get(XARGS_KEY)
    inner = xargs.get(key, _MISSING) if isinstance(xargs, dict) else _MISSING
    if top is None:
        top = _MISSING
    if inner is None:
        inner = _MISSING
    if top is not _MISSING and inner is not _MISSING:
        same = type(top) is type(inner) and top == inner
        if not same:
            raise EvictionParamError(
                f"{key} is given both top-level ({_describe(top)}) and in {XARGS_KEY} "
                f"({_describe(inner)}) with different values; give it once",
                key,
            )
    if top is not _MISSING:
        return top, key
    return inner, f"{XARGS_KEY}.{key}"


def check_budget(value: Any, param: str, limits: Limits) -> int:
    """``value`` as a budget in tokens, or :class:`EvictionParamError`."""
    allowed = limits.range_text()
    if type(value) is not int:  # bool is an int subclass; reject it too
        raise EvictionParamError(
            f"{param} must be an integer number of tokens, got {_describe(value)}; "
            f"allowed: {allowed}",
            param,
        )
    if value == 0:
        return 0
    if value < 0:
        problem = "must not be negative"
    elif value < limits.min_budget:
        problem = (
            f"is below the minimum budget {limits.min_budget} (sink tokens + window + one block)"
        )
    elif value > limits.max_budget:
        problem = f"is above max_model_len {limits.max_budget}"
    else:
        return value
    raise EvictionParamError(f"{param} {problem}, got {_shown(value)}; allowed: {allowed}", param)


def check_policy(value: Any, param: str, policies: Iterable[str]) -> str:
    """The canonical policy name for ``value``, or :class:`EvictionParamError`.

    Names are matched like :func:`vllm_caote.scoring.get_policy` does (case-insensitive,
    ``_`` accepted for ``-``).
    """
    names = list(policies)
    valid = ", ".join(names)
    if not isinstance(value, str):
        raise EvictionParamError(
            f"{param} must be a string naming an eviction policy, got {_describe(value)}; "
            f"valid policies: {valid}",
            param,
        )
    key = value.strip().lower().replace("_", "-")
    if key not in names:
        raise EvictionParamError(
            f"{param} names an unknown eviction policy {_shown(value)}; valid policies: {valid}",
            param,
        )
    return key


def check_recent(value: Any, param: str) -> float:
    """``value`` as a recent share in [0, 1], or :class:`EvictionParamError`."""
    if type(value) not in (int, float) or value != value:  # bools, strings, NaN
        raise EvictionParamError(
            f"{param} must be a number in [0, 1] (the share of the budget kept as the newest "
            f"tokens), got {_describe(value)}",
            param,
        )
    if not 0.0 <= value <= 1.0:
        raise EvictionParamError(
            f"{param} must be in [0, 1] (the share of the budget kept as the newest tokens), "
            f"got {_shown(value)}",
            param,
        )
    return float(value)


def resolve(body: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    """The ``extra_args`` entries to forward for this request body.

    Returns ``{}`` (stock vLLM), ``{"kv_budget": 0}`` (eviction explicitly off) or
    ``{"kv_budget": n, "kv_policy": name}`` (and ``"kv_recent": share`` if the request gave
    one). Raises :class:`EvictionParamError`.
    """
    budget, budget_param = _pick(body, BUDGET_KEY)
    policy, policy_param = _pick(body, POLICY_KEY)
    recent, recent_param = _pick(body, RECENT_KEY)
    if policy is not _MISSING:
        policy = check_policy(policy, policy_param, limits.policies)
    if recent is not _MISSING:
        recent = check_recent(recent, recent_param)
    given = budget is not _MISSING
    budget = check_budget(budget, budget_param, limits) if given else limits.default_budget
    if budget == 0:
        if recent is not _MISSING:
            why = f"{BUDGET_KEY} is 0" if given else f"no {BUDGET_KEY} and no server default"
            raise EvictionParamError(
                f"{recent_param} shapes what a budget keeps, but this request has none ({why}): "
                f"give {BUDGET_KEY} too, or drop {RECENT_KEY}",
                recent_param,
            )
        # An explicit 0 is forwarded, so that no engine-side default can apply to it.
        return {BUDGET_KEY: 0} if given else {}
    out = {
        BUDGET_KEY: budget,
        POLICY_KEY: limits.default_policy if policy is _MISSING else policy,
    }
    if recent is not _MISSING:
        out[RECENT_KEY] = recent
    return out


def rewrite(body: dict[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` without the client's eviction keys and with ``params`` in ``vllm_xargs``."""
    out = {k: v for k, v in body.items() if k not in REQUEST_KEYS}
    xargs = body.get(XARGS_KEY)
    if isinstance(xargs, dict):
        xargs = {k: v for k, v in xargs.items() if k not in REQUEST_KEYS}
    else:
        xargs = {}
    xargs.update(params)
    if xargs:
        out[XARGS_KEY] = xargs
    elif XARGS_KEY in out:
        out[XARGS_KEY] = None
    return out
