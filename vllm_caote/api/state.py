"""What the API server's two halves share: per-app settings and the captured statistics.

:mod:`.server` (the ``build_app`` wrapper and the endpoint plugin) and :mod:`.middleware` (the
ASGI middleware) both import from here, and this module imports neither of them, so the
dependency runs one way: ``server -> middleware -> state`` and ``server -> state``.

* :class:`Runtime`: the limits and defaults of one app, filled in once the engine client
  exists (:meth:`Runtime.configure`), read by the middleware on every request.
* :class:`_Capture` and the context variable ``_CAPTURE``: the middleware sets a capture for a
  budgeted HTTP request; the wrapped ``AsyncLLM.generate`` (:func:`_wrap_generate`) pops the
  engine's ``kv_eviction`` stats from each ``RequestOutput`` into it (:func:`pop_stats`).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

from vllm_caote.config import STATS_KEY, settings
from vllm_caote.engine.output_processor import CHOICES_KEY

from .params import EvictionParamError, Limits, check_budget

logger = logging.getLogger("vllm_caote.api")


# ---------------------------------------------------------------------------------------
# Server state
# ---------------------------------------------------------------------------------------
class Runtime:
    """Per-app settings, filled in once the engine client exists."""

    def __init__(self) -> None:
        self.limits: Limits | None = None
        self.info: dict[str, Any] = {}

    def configure(self, vllm_config: Any) -> None:
        s = settings(vllm_config)
        block_size = int(vllm_config.cache_config.block_size)
        limits = Limits.for_engine(block_size, int(vllm_config.model_config.max_model_len), s)
        if s.default_budget:
            try:
                check_budget(s.default_budget, "kv_eviction.default_budget", limits)
            except EvictionParamError as e:
                raise ValueError(f"vllm-caote: bad server default: {e}") from None
        self.limits = limits
        self.info = {
            "policies": list(limits.policies),
            "default_policy": limits.default_policy,
            "default_budget": limits.default_budget,
            "min_budget": limits.min_budget,
            "max_model_len": limits.max_budget,
            "block_size": block_size,
            "sink_tokens": s.sinks,
            "prefill_chunk": s.prefill_chunk,
            "window": s.window,
        }
        logger.info(
            "vllm-caote API: kv_budget 0 or [%d, %d], default budget %d, default policy %s",
            limits.min_budget,
            limits.max_budget,
            limits.default_budget,
            limits.default_policy,
        )


# ---------------------------------------------------------------------------------------
# Statistics capture (engine client side)
# ---------------------------------------------------------------------------------------
class _Capture:
    """Eviction stats of the engine requests of one HTTP request, in submission order: one
    slot per prompt, each a list with one entry per choice (``n``)."""

    __slots__ = ("slots",)

    def __init__(self) -> None:
        self.slots: list[list[dict[str, Any] | None] | None] = []

    def stats(self) -> dict[str, Any] | None:
        """Stats of the first choice that has any (like ``kv_transfer_params``)."""
        return next((s for c in self.slots if c for s in c if s is not None), None)

    def per_choice(self) -> list[dict[str, Any] | None] | None:
        """Stats per response choice (prompt-major, as vLLM numbers choices), when some
        prompt had ``n > 1``; None otherwise."""
        if not any(c and len(c) > 1 for c in self.slots):
            return None
        return [s for c in self.slots for s in (c or [None])]

    async def track(self, gen: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
        slot = len(self.slots)
        self.slots.append(None)
        try:
            async for out in gen:
                choices = pop_stats(out)
                if choices is not None:
                    self.slots[slot] = choices
                yield out
        finally:
            await gen.aclose()


_CAPTURE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar(
    "vllm_caote_capture", default=None
)


def pop_stats(output: Any) -> list[dict[str, Any] | None] | None:
    """Remove the eviction stats from ``output.kv_transfer_params``; return them per choice
    (one entry unless ``n > 1``, see :mod:`vllm_caote.engine.output_processor`)."""
    params = getattr(output, "kv_transfer_params", None)
    if not isinstance(params, dict) or STATS_KEY not in params:
        return None
    rest = {k: v for k, v in params.items() if k not in (STATS_KEY, CHOICES_KEY)}
    output.kv_transfer_params = rest or None
    return params.get(CHOICES_KEY) or [params[STATS_KEY]]


def _wrap_generate(generate: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(generate, "_caote_wrapped", False):
        return generate

    def generate_with_kv_eviction(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        gen = generate(*args, **kwargs)
        capture = _CAPTURE.get()
        return gen if capture is None else capture.track(gen)

    generate_with_kv_eviction.__wrapped__ = generate  # type: ignore[attr-defined]
    generate_with_kv_eviction._caote_wrapped = True  # type: ignore[attr-defined]
    return generate_with_kv_eviction
