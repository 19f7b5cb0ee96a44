"""The API-server patch: eviction parameters in, eviction statistics out.

It wraps one vLLM function, ``vllm.entrypoints.launchers.app.build_app`` (vLLM 0.32), and
rebinds the name where the API server already imported it
(``vllm.entrypoints.launchers.api_server.entry``, ``vllm.entrypoints.openai.api_server``,
or ``__main__`` when one of them is run with ``python -m``). Nothing of the server is forked.
On the app that ``build_app`` returns (only when the server supports the ``generate`` task)
the wrapper:

1. adds ``GET /v1/kv_eviction/policies``;
2. adds :class:`~vllm_caote.api.middleware.KvEvictionMiddleware`, a pure ASGI middleware placed innermost among the
   user middlewares (so CORS, API-key authentication, etc. run first). For ``POST
   /v1/completions`` and ``/v1/chat/completions`` it validates ``kv_budget`` /
   ``kv_policy`` / ``kv_recent`` (top-level or in ``vllm_xargs``, see :mod:`vllm_caote.api.params`),
   answers a bad value with vLLM's own 400 ``ErrorResponse``, applies the server defaults
   and rewrites the body so the resolved values travel in ``vllm_xargs``, which vLLM's
   ``to_sampling_params`` copies into ``SamplingParams.extra_args``;
3. appends an endpoint-plugin object to ``app.state.endpoint_plugins``, so that vLLM's
   own ``init_app_state`` -> ``init_endpoint_plugins_state`` hands it the engine client.
   There it reads ``cache_config.block_size`` and ``model_config.max_model_len`` from
   ``engine_client.vllm_config`` and wraps that instance's ``generate``
   (``vllm.v1.engine.async_llm.AsyncLLM.generate``).

Statistics flow: the engine puts ``{"kv_eviction": {...}}`` into the finished
``EngineCoreOutput.kv_transfer_params``; vLLM's ``OutputProcessor`` copies it into
``RequestOutput.kv_transfer_params``. The ``generate`` wrapper, active only inside a
budgeted HTTP request (a context variable set by the middleware), pops it from there
(dropping ``kv_transfer_params`` when it becomes empty) before the serving code sees it and
keeps it for the middleware, which adds a top-level ``"kv_eviction"`` object to the JSON
response, or to the final SSE chunk of a stream (the usage chunk when there is one,
otherwise the last chunk before ``[DONE]``). Requests without a budget are not touched.

Imports run one way: this module uses :mod:`.middleware` and :mod:`.state` (the per-app
:class:`~vllm_caote.api.state.Runtime` and the stats capture, shared with the middleware);
neither imports this one.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from .middleware import KvEvictionMiddleware
from .state import Runtime, _wrap_generate

logger = logging.getLogger("vllm_caote.api")

POLICIES_PATH = "/v1/kv_eviction/policies"
_APP_MODULE = "vllm.entrypoints.launchers.app"
_IMPORTERS = ("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server")


# ---------------------------------------------------------------------------------------
# Installation
# ---------------------------------------------------------------------------------------
def is_api_server_process() -> bool:
    """True in a process that has loaded vLLM's API-server launcher (and may build the app).

    Engine-core and worker processes never import it (or, when forked from the API server,
    never call ``build_app``), so the patch stays off the engine side.
    """
    return _APP_MODULE in sys.modules


def install() -> bool:
    """Wrap ``build_app`` wherever the API server looks it up. Idempotent.

    Returns True if this call installed the wrapper.
    """
    app_mod = sys.modules.get(_APP_MODULE)
    if app_mod is None:
        return False
    original = app_mod.build_app
    if getattr(original, "_caote_wrapped", False):
        return False
    wrapped = _wrap_build_app(original)
    app_mod.build_app = wrapped
    for name in (*_IMPORTERS, "__main__", "__mp_main__"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "build_app", None) is original:
            mod.build_app = wrapped
    logger.debug("vllm-caote: wrapped %s.build_app", _APP_MODULE)
    return True


def _wrap_build_app(build_app: Callable[..., Any]) -> Callable[..., Any]:
    def build_app_with_kv_eviction(args, supported_tasks=None, model_config=None, **kwargs):
        app = build_app(args, supported_tasks, model_config, **kwargs)
        if supported_tasks is not None and "generate" not in supported_tasks:
            return app
        from starlette.middleware import Middleware

        runtime = Runtime()
        plugin = EvictionEndpoints(runtime)
        plugin.attach_router(app)
        # Innermost user middleware: runs after CORS / authentication / request-id.
        app.user_middleware.append(Middleware(KvEvictionMiddleware, runtime=runtime))
        # build_app may already have built the stack (vLLM's SageMaker bootstrap rebuilds it
        # eagerly); drop it so Starlette rebuilds it, with ours, on the first request.
        app.middleware_stack = None
        app.state.endpoint_plugins = [*getattr(app.state, "endpoint_plugins", []), plugin]
        return app

    build_app_with_kv_eviction.__wrapped__ = build_app  # type: ignore[attr-defined]
    build_app_with_kv_eviction._caote_wrapped = True  # type: ignore[attr-defined]
    build_app_with_kv_eviction.__doc__ = build_app.__doc__
    return build_app_with_kv_eviction


# ---------------------------------------------------------------------------------------
# The endpoint plugin
# ---------------------------------------------------------------------------------------
class EvictionEndpoints:
    """Follows vLLM's ``EndpointPlugin`` protocol (``vllm.plugins.endpoint_plugins``).

    Attached by the ``build_app`` wrapper rather than through the ``vllm.endpoint_plugins``
    entry-point group, which vLLM only loads when named in ``VLLM_PLUGINS``.
    """

    name = "vllm-caote-kv-eviction"
    required_tasks = ("generate",)

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def attach_router(self, app: Any) -> None:
        app.add_api_route(POLICIES_PATH, self.policies, methods=["GET"])

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        if engine_client is None:  # the CPU-only render server: nothing to generate
            return
        self.runtime.configure(engine_client.vllm_config)
        engine_client.generate = _wrap_generate(engine_client.generate)

    async def policies(self) -> Any:
        from starlette.responses import JSONResponse

        if self.runtime.limits is None:
            return JSONResponse({"error": "vllm-caote is not initialised"}, status_code=503)
        return JSONResponse(self.runtime.info)
