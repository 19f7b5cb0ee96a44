"""The ASGI middleware of the API layer: ``kv_budget`` / ``kv_policy`` in, ``kv_eviction`` out.

:class:`KvEvictionMiddleware` is added by the ``build_app`` wrapper of :mod:`.server`. For
``POST /v1/completions``, ``/v1/chat/completions`` and ``/v1/responses`` it validates the
eviction parameters (400 in vLLM's own error format), applies the server defaults, forwards the
result in ``vllm_xargs`` and adds the engine's per-request statistics to the JSON response or to
the final chunk of a stream (:class:`_StatsSender`, :class:`_SseInjector`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from vllm_caote.config import BUDGET_KEY, REQUEST_KEYS, STATS_KEY

from .params import XARGS_KEY, EvictionParamError, resolve, rewrite
from .state import _CAPTURE, Runtime, _Capture

_GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses"})
# Bodies without these bytes cannot name our keys (b"\\u" catches escaped key names).
#: a body holding none of these needs no parsing (a JSON escape may spell a key)
_MARKERS = (*(k.encode() for k in REQUEST_KEYS), b"\\u")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


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
    """Validates/forwards ``kv_budget``/``kv_policy``/``kv_recent`` and returns ``kv_eviction``
    stats."""

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
        # completions / chat ("choices") and the Responses API ("object": "response")
        if not isinstance(obj, dict) or not ("choices" in obj or obj.get("object") == "response"):
            return body
        obj[STATS_KEY] = stats
        per_choice = self.capture.per_choice()
        if per_choice is not None:  # n > 1: each choice its own stats, by its index
            for choice in obj.get("choices") or []:
                i = choice.get("index") if isinstance(choice, dict) else None
                if isinstance(i, int) and 0 <= i < len(per_choice):
                    choice[STATS_KEY] = per_choice[i]
        return _dumps(obj)


class _SseInjector:
    """Puts the stats into the final ``data:`` event of an SSE stream.

    A chunk that finishes a choice is held back until the next event shows whether it was
    the last one (``[DONE]`` follows) or a usage chunk (``choices == []``) follows, which then
    gets the stats instead. A Responses API stream gets them inside the ``response`` of its
    ``response.completed`` event. Other events pass straight through, so streaming is not
    delayed.
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

    def _completed_response(self, event: bytes) -> bytes:
        """The Responses API's ``response.completed`` event: stats into its ``response``."""
        head, sep, data = event.partition(b"\ndata:")
        stats = self.capture.stats()
        if not sep or stats is None or self.injected:
            return event
        try:
            obj = json.loads(data)
        except ValueError:
            return event
        if not isinstance(obj, dict) or not isinstance(obj.get("response"), dict):
            return event
        self.injected = True
        obj["response"][STATS_KEY] = stats
        return head + b"\ndata: " + _dumps(obj) + b"\n\n"

    def _event(self, event: bytes) -> list[bytes]:
        if event.startswith(b"event: response.completed\n"):
            return [*self._release(inject=False), self._completed_response(event)]
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
