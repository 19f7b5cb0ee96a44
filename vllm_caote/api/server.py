"""The API-server patch: eviction parameters in, eviction statistics out.

It wraps one vLLM function, ``vllm.entrypoints.launchers.app.build_app`` (vLLM 0.32), and
rebinds the name where the API server already imported it
(``vllm.entrypoints.launchers.api_server.entry``, ``vllm.entrypoints.openai.api_server``,
or ``__main__`` when one of them is run with ``python -m``). Nothing of the server is forked.
On the app that ``build_app`` returns (only when the server supports the ``generate`` task)
the wrapper:

1. adds ``GET /v1/kv_eviction/policies``;
2. adds :class:`KvEvictionMiddleware`, a pure ASGI middleware placed innermost among the
   user middlewares (so CORS, API-key authentication, etc. run first). For ``POST
   /v1/completions`` and ``/v1/chat/completions`` it validates ``kv_budget`` /
   ``kv_policy`` (top-level or in ``vllm_xargs``, see :mod:`vllm_caote.api.params`),
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
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, MutableMapping
from typing import Any

from vllm_caote.config import BUDGET_KEY, STATS_KEY, settings

from .params import XARGS_KEY, EvictionParamError, Limits, check_budget, resolve, rewrite

logger = logging.getLogger("vllm_caote.api")

POLICIES_PATH = "/v1/kv_eviction/policies"
_GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses"})
# Bodies without these bytes cannot name our keys (b"\\u" catches escaped key names).
_MARKERS = (b"kv_budget", b"kv_policy", b"\\u")
_APP_MODULE = "vllm.entrypoints.launchers.app"
_IMPORTERS = ("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


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
# Server state and the endpoint plugin
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


# ---------------------------------------------------------------------------------------
# Statistics capture (engine client side)
# ---------------------------------------------------------------------------------------
class _Capture:
    """Eviction stats of the engine requests of one HTTP request, in submission order."""

    __slots__ = ("slots",)

    def __init__(self) -> None:
        self.slots: list[dict[str, Any] | None] = []

    def stats(self) -> dict[str, Any] | None:
        """Stats of the first prompt that has any (like ``kv_transfer_params``)."""
        return next((s for s in self.slots if s is not None), None)

    async def track(self, gen: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
        slot = len(self.slots)
        self.slots.append(None)
        try:
            async for out in gen:
                stats = pop_stats(out)
                if stats is not None:
                    self.slots[slot] = stats
                yield out
        finally:
            await gen.aclose()


_CAPTURE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar(
    "vllm_caote_capture", default=None
)


def pop_stats(output: Any) -> dict[str, Any] | None:
    """Remove and return ``kv_eviction`` from ``output.kv_transfer_params``."""
    params = getattr(output, "kv_transfer_params", None)
    if not isinstance(params, dict) or STATS_KEY not in params:
        return None
    rest = {k: v for k, v in params.items() if k != STATS_KEY}
    output.kv_transfer_params = rest or None
    return params[STATS_KEY]


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


# ---------------------------------------------------------------------------------------
# The middleware
# ---------------------------------------------------------------------------------------
def _dumps(obj: Any) -> bytes:
    # Same encoding as starlette's JSONResponse / pydantic's compact JSON.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _error_response(err: EvictionParamError) -> tuple[int, bytes]:
    """vLLM's own ``ErrorResponse`` for a validation error (as its handlers build it)."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.exceptions import VLLMValidationError

    resp = create_error_response(VLLMValidationError(str(err), parameter=err.param))
    return resp.error.code, _dumps(resp.model_dump())


def _with_content_length(headers: list[tuple[bytes, bytes]], n: int) -> list[tuple[bytes, bytes]]:
    out = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    out.append((b"content-length", str(n).encode("latin-1")))
    return out


def _check_beam_search(data: dict[str, Any], params: dict[str, Any]) -> None:
    """vLLM's beam search ignores ``extra_args``: refuse a budget the request asked for.

    A server-default budget is not an error; such requests just run without eviction.
    """
    xargs = data.get(XARGS_KEY) or {}
    asked = data.get(BUDGET_KEY) is not None or xargs.get(BUDGET_KEY) is not None
    if asked and params.get(BUDGET_KEY):
        raise EvictionParamError(
            "kv_budget is not supported with use_beam_search; send kv_budget: 0 or drop "
            "use_beam_search",
            BUDGET_KEY,
        )


class KvEvictionMiddleware:
    """Validates/forwards ``kv_budget``/``kv_policy`` and returns ``kv_eviction`` stats."""

    def __init__(self, app: Callable[..., Awaitable[None]], runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    def _applies(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return False
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return path in _GENERATE_PATHS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limits = self.runtime.limits
        if limits is None or not self._applies(scope):
            await self.app(scope, receive, send)
            return

        chunks: list[bytes] = []
        pending: list[Message] = []  # a disconnect received while reading the body
        while True:
            message = await receive()
            if message["type"] != "http.request":
                pending.append(message)
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)

        params: dict[str, Any] = {}
        new_body: bytes | None = None
        if limits.default_budget or any(m in body for m in _MARKERS):
            try:
                data = json.loads(body)
            except (ValueError, RecursionError):
                data = None  # not JSON: vLLM answers it
            xargs_ok = isinstance(data, dict) and isinstance(data.get(XARGS_KEY), dict | None)
            if xargs_ok:
                try:
                    params = resolve(data, limits)
                    if data.get("use_beam_search"):
                        _check_beam_search(data, params)
                except EvictionParamError as err:
                    await self._reject(err, send)
                    return
                new = rewrite(data, params)
                if new != data:
                    new_body = _dumps(new)
                if data.get("use_beam_search"):
                    params = {}  # beam search drops extra_args: no eviction, no stats

        if new_body is not None:
            body = new_body
            scope = dict(scope)
            scope["headers"] = _with_content_length(list(scope.get("headers", [])), len(body))

        replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
        replay.extend(pending)

        async def receive_replayed() -> Message:
            if replay:
                return replay.pop(0)
            return await receive()

        if not params.get(BUDGET_KEY):
            await self.app(scope, receive_replayed, send)
            return
        capture = _Capture()
        token = _CAPTURE.set(capture)
        try:
            await self.app(scope, receive_replayed, _StatsSender(send, capture))
        finally:
            _CAPTURE.reset(token)

    @staticmethod
    async def _reject(err: EvictionParamError, send: Send) -> None:
        status, payload = _error_response(err)
        headers = _with_content_length([(b"content-type", b"application/json")], len(payload))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload, "more_body": False})


class _StatsSender:
    """Wraps ``send`` to add ``kv_eviction`` to a 200 JSON body or to the final SSE chunk."""

    def __init__(self, send: Send, capture: _Capture) -> None:
        self.send = send
        self.capture = capture
        self.mode = "pass"
        self.start: Message | None = None
        self.chunks: list[bytes] = []
        self.sse: _SseInjector | None = None

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            ctype = b""
            for k, v in message.get("headers", []):
                if k.lower() == b"content-type":
                    ctype = v.lower()
            if message.get("status") == 200 and ctype.startswith(b"application/json"):
                self.mode, self.start = "json", message
                return
            if message.get("status") == 200 and ctype.startswith(b"text/event-stream"):
                self.mode, self.sse = "sse", _SseInjector(self.capture)
            await self.send(message)
            return
        if kind != "http.response.body" or self.mode == "pass":
            await self.send(message)
            return
        more = bool(message.get("more_body", False))
        if self.mode == "json":
            self.chunks.append(message.get("body", b""))
            if more:
                return
            body = self._inject_json(b"".join(self.chunks))
            assert self.start is not None
            start = dict(self.start)
            start["headers"] = _with_content_length(list(start.get("headers", [])), len(body))
            await self.send(start)
            await self.send({"type": "http.response.body", "body": body, "more_body": False})
            return
        assert self.sse is not None
        out = self.sse.feed(message.get("body", b""), final=not more)
        if out or not more:
            await self.send({"type": "http.response.body", "body": out, "more_body": more})

    def _inject_json(self, body: bytes) -> bytes:
        stats = self.capture.stats()
        if stats is None:
            return body
        try:
            obj = json.loads(body)
        except ValueError:
            return body
        if not isinstance(obj, dict) or "choices" not in obj:
            return body
        obj[STATS_KEY] = stats
        return _dumps(obj)


class _SseInjector:
    """Puts the stats into the final ``data:`` event of an SSE stream.

    A chunk that finishes a choice is held back until the next event shows whether it was
    the last one (``[DONE]`` follows) or a usage chunk (``choices == []``) follows, which then
    gets the stats instead. Other events pass straight through, so streaming is not delayed.
    """

    def __init__(self, capture: _Capture) -> None:
        self.capture = capture
        self.buf = b""
        self.held: tuple[bytes, dict[str, Any]] | None = None
        self.injected = False

    def feed(self, data: bytes, final: bool) -> bytes:
        self.buf += data
        out: list[bytes] = []
        while (end := self.buf.find(b"\n\n")) >= 0:
            event, self.buf = self.buf[: end + 2], self.buf[end + 2 :]
            out.extend(self._event(event))
        if final:
            out.extend(self._release(inject=True))
            if self.buf:
                out.append(self.buf)
                self.buf = b""
        return b"".join(out)

    def _release(self, inject: bool) -> list[bytes]:
        if self.held is None:
            return []
        event, obj = self.held
        self.held = None
        return [self._inject(event, obj) if inject else event]

    def _inject(self, event: bytes, obj: dict[str, Any]) -> bytes:
        stats = self.capture.stats()
        if stats is None or self.injected:
            return event
        self.injected = True
        obj[STATS_KEY] = stats
        return b"data: " + _dumps(obj) + b"\n\n"

    def _event(self, event: bytes) -> list[bytes]:
        if not event.startswith(b"data:"):
            return [event]  # SSE comment, e.g. vLLM's keep-alive
        payload = event[5:].strip()
        if payload == b"[DONE]":
            return [*self._release(inject=True), event]
        out = self._release(inject=False)
        if self.injected:
            return [*out, event]
        try:
            obj = json.loads(payload)
        except ValueError:
            return [*out, event]
        if not isinstance(obj, dict):
            return [*out, event]
        choices = obj.get("choices")
        if isinstance(choices, list) and any(
            isinstance(c, dict) and c.get("finish_reason") is not None for c in choices
        ):
            self.held = (event, obj)
            return out
        if choices == [] and obj.get("usage") is not None:
            return [*out, self._inject(event, obj)]
        return [*out, event]
