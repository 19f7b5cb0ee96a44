"""vLLM plugin entry point (``vllm.general_plugins``).

vLLM calls :func:`register` once in every process it starts (API server, engine core,
workers). It checks the installed vLLM against the register of every contact the plugin has
with vLLM internals (:mod:`vllm_caote.compat`), then installs, from this one place:

* the engine-config hook that selects the plugin's scheduler and worker classes
  (:mod:`vllm_caote.configure`);
* the attention backends, through vLLM's backend registry (:mod:`vllm_caote.engine.attention`);
* engine-side validation of ``kv_budget`` / ``kv_policy`` (:mod:`.engine.input_processor`);
* per-choice statistics for ``n > 1`` (:mod:`.engine.output_processor`);
* in the OpenAI front-end only, the API layer (:mod:`vllm_caote.api`).

Requests without a budget run exactly as in stock vLLM. ``CAOTE_DISABLE=1`` loads nothing.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.vllm_caote")

_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    if os.environ.get("CAOTE_DISABLE", "0") == "1":
        logger.info("vllm-caote disabled by CAOTE_DISABLE=1")
        return
    from vllm_caote import compat, configure
    from vllm_caote.engine import attention, input_processor, output_processor

    compat.check()  # a vLLM the plugin was not built for stops here, naming the symbol
    configure.install()
    attention.install()
    input_processor.install()
    output_processor.install()

    from vllm_caote import api

    if api.is_api_server_process():  # OpenAI front-end only; a no-op in engine processes
        api.install()
