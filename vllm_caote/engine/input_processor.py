"""Front-end validation of ``kv_budget`` / ``kv_policy`` (API-server / LLM process).

Wraps ``vllm.v1.engine.input_processor.InputProcessor.process_inputs``: a bad value raises
:class:`~vllm_caote.validation.EvictionArgsError` (a ``ValueError`` and vLLM's
``VLLMValidationError``, so the OpenAI server answers HTTP 400 naming the field) before the
request reaches the engine; a good one is resolved against the server defaults and written,
explicitly, into the engine request's own copy of ``SamplingParams.extra_args``.
"""

from __future__ import annotations

from vllm_caote.config import BUDGET_KEY, POLICY_KEY
from vllm_caote.validation import resolve


def install() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor, "_caote_patched", False):
        return
    InputProcessor._caote_patched = True
    orig = InputProcessor.process_inputs

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        resolved = None
        if isinstance(params, SamplingParams):
            resolved = resolve(
                params.extra_args, self.cache_config.block_size, self.model_config.max_model_len
            )
        out = orig(self, request_id, prompt, params, *args, **kwargs)
        sp = getattr(out, "sampling_params", None)
        if isinstance(params, SamplingParams) and sp is not None:
            extra = dict(sp.extra_args or {})
            extra.pop(BUDGET_KEY, None)
            extra.pop(POLICY_KEY, None)
            if resolved is not None:
                extra[BUDGET_KEY], extra[POLICY_KEY] = resolved
            sp.extra_args = extra or None
        return out

    InputProcessor.process_inputs = process_inputs
