"""Engine-side validation of ``kv_budget`` / ``kv_policy`` (API-server / ``LLM`` process).

Wraps ``InputProcessor.process_inputs`` (a registered patch, ``vllm_caote.compat``): a bad
value raises :class:`~vllm_caote.api.params.EvictionParamError` (vLLM's
``VLLMValidationError``, so the OpenAI server answers HTTP 400 naming the field; offline, a
``ValueError``) before the request reaches the engine. A good one is written, resolved, into the
engine request's own copy of ``SamplingParams.extra_args``. The server-wide default budget is
not applied here: that is the HTTP layer's job (beam search builds its own parameters, so a
default applied here would reach every beam step with no way to opt out).
"""

from __future__ import annotations

from vllm_caote.api.params import Limits, resolve
from vllm_caote.config import BUDGET_KEY, REQUEST_KEYS, settings


def install() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, "_caote_wrapped", False):
        return

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        resolved = None
        if isinstance(params, SamplingParams):
            limits = self.__dict__.get("_caote_limits")
            if limits is None:
                limits = self.__dict__["_caote_limits"] = Limits.for_engine(
                    self.cache_config.block_size,
                    self.model_config.max_model_len,
                    settings(self.vllm_config),
                    with_default=False,
                )
            resolved = resolve(params.extra_args or {}, limits)
        out = original(self, request_id, prompt, params, *args, **kwargs)
        sp = getattr(out, "sampling_params", None)
        if resolved is not None and sp is not None:
            extra = {k: v for k, v in (sp.extra_args or {}).items() if k not in REQUEST_KEYS}
            if resolved.get(BUDGET_KEY):
                extra.update(resolved)
            sp.extra_args = extra or None
        return out

    process_inputs._caote_wrapped = True  # type: ignore[attr-defined]
    process_inputs.__wrapped__ = original  # type: ignore[attr-defined]
    InputProcessor.process_inputs = process_inputs
