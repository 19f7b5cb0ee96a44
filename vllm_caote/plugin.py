"""vLLM plugin entry point (``vllm.general_plugins``).

vLLM calls :func:`register` once in every process it starts (API server, engine core, workers).
It installs the engine patches from :mod:`vllm_caote.engine`; each patch is inert for requests
that do not ask for eviction, so stock requests run exactly as in stock vLLM.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm_caote")

_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    if os.environ.get("VLLM_CAOTE_DISABLE", "0") == "1":
        logger.info("vllm-caote disabled by VLLM_CAOTE_DISABLE=1")
        return
    from vllm_caote.engine import install

    install()

    from vllm_caote import api

    if api.is_api_server_process():  # OpenAI front-end only; a no-op in engine processes
        api.install()
