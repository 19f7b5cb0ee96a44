"""The OpenAI-server side: ``kv_budget`` / ``kv_policy`` in, ``kv_eviction`` stats out.

Unit tests of :mod:`vllm_caote.api.params` run without a server. Everything marked
``server`` talks to the one real vLLM OpenAI server of the session (``caote_server`` in
``conftest.py``), started with ``CAOTE_DEFAULT_POLICY=caote-snapkv`` and
``CAOTE_DEFAULT_BUDGET=1024``. Tests named ``test_stats_*`` read the statistics the
engine reports, so they need the engine patches of :mod:`vllm_caote.engine`.
"""

from __future__ import annotations

import ast
import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from vllm_caote.api.params import EvictionParamError, Limits, resolve, rewrite
from vllm_caote.scoring.registry import policy_names

STATS_FIELDS = {"budget", "policy", "evicted_tokens", "peak_blocks", "peak_tokens"}
DEFAULT_BUDGET = 1024
DEFAULT_POLICY = "caote-snapkv"
TIMEOUT = 120
# ~350 tokens: longer than the smallest budget (164 on CPU), so the engine has to evict.
LONG_PROMPT = " ".join(
    f"Note {i}: the {c} fox jumped over {i % 7} lazy dogs." for i, c in enumerate("abcdefgh" * 3)
)


# ---------------------------------------------------------------------------------------
# Unit tests of the validation rules (no server)
# ---------------------------------------------------------------------------------------
def _limits(default_budget: int = 0) -> Limits:
    return Limits(164, 4096, default_budget, DEFAULT_POLICY, tuple(policy_names()))


def test_resolve_no_budget_no_default_forwards_nothing():
    assert resolve({}, _limits()) == {}
    assert resolve({"kv_policy": "tova"}, _limits()) == {}  # a policy alone evicts nothing
    assert rewrite({"prompt": "x"}, {}) == {"prompt": "x"}


def test_resolve_defaults_and_overrides():
    lim = _limits(1024)
    assert resolve({}, lim) == {"kv_budget": 1024, "kv_policy": DEFAULT_POLICY}
    assert resolve({"kv_budget": None}, lim) == {"kv_budget": 1024, "kv_policy": DEFAULT_POLICY}
    assert resolve({"kv_budget": 0}, lim) == {"kv_budget": 0}
    assert resolve({"kv_budget": 2048, "kv_policy": "TOVA"}, lim) == {
        "kv_budget": 2048,
        "kv_policy": "tova",
    }
    assert resolve({"vllm_xargs": {"kv_budget": 164, "kv_policy": "fast_caote_h2o"}}, lim) == {
        "kv_budget": 164,
        "kv_policy": "fast-caote-h2o",
    }


def test_rewrite_moves_keys_into_vllm_xargs():
    body = {"prompt": "x", "kv_budget": 300, "vllm_xargs": {"kv_policy": "h2o", "other": 1}}
    params = resolve(body, _limits())
    assert rewrite(body, params) == {
        "prompt": "x",
        "vllm_xargs": {"other": 1, "kv_budget": 300, "kv_policy": "h2o"},
    }


@pytest.mark.parametrize(
    "value", [True, False, 1.5, 2048.0, "2048", -1, 1, 163, 4097, 2**80, [2048], {"a": 1}]
)
@pytest.mark.parametrize("where", ["top", "xargs"])
def test_resolve_rejects_bad_budget(value, where):
    body = {"kv_budget": value} if where == "top" else {"vllm_xargs": {"kv_budget": value}}
    with pytest.raises(EvictionParamError) as e:
        resolve(body, _limits(1024))
    assert e.value.param == ("kv_budget" if where == "top" else "vllm_xargs.kv_budget")
    assert "kv_budget" in str(e.value) and "[164, 4096]" in str(e.value)


def test_resolve_kv_recent():
    """``kv_recent`` goes with a budget (the request's or the server's), as a float in [0, 1];
    anything else, or a share with no budget to shape, is an error naming the field."""
    assert resolve({"kv_budget": 512, "kv_recent": 0.75}, _limits()) == {
        "kv_budget": 512,
        "kv_policy": DEFAULT_POLICY,
        "kv_recent": 0.75,
    }
    assert resolve({"vllm_xargs": {"kv_recent": 1}}, _limits(1024))["kv_recent"] == 1.0
    assert "kv_recent" not in resolve({"kv_budget": 512, "kv_recent": None}, _limits())
    body = {"prompt": "x", "kv_budget": 300, "kv_recent": 0.5}
    assert rewrite(body, resolve(body, _limits())) == {
        "prompt": "x",
        "vllm_xargs": {"kv_budget": 300, "kv_policy": DEFAULT_POLICY, "kv_recent": 0.5},
    }
    for bad in (True, "0.5", -0.1, 1.5, float("nan"), [0.5]):
        with pytest.raises(EvictionParamError, match=r"kv_recent .*\[0, 1\]") as e:
            resolve({"kv_budget": 512, "kv_recent": bad}, _limits())
        assert e.value.param == "kv_recent"
    for body in ({"kv_recent": 0.5}, {"kv_budget": 0, "vllm_xargs": {"kv_recent": 0.5}}):
        with pytest.raises(EvictionParamError, match="give kv_budget too") as e:
            resolve(body, _limits())
    assert e.value.param == "vllm_xargs.kv_recent"


def test_resolve_rejects_conflicting_values():
    with pytest.raises(EvictionParamError, match="both top-level"):
        resolve({"kv_budget": 200, "vllm_xargs": {"kv_budget": 300}}, _limits())
    assert resolve({"kv_budget": 200, "vllm_xargs": {"kv_budget": 200}}, _limits())["kv_budget"]


# ---------------------------------------------------------------------------------------
# The middleware and the stats plumbing in-process (a fake engine, no vLLM server)
# ---------------------------------------------------------------------------------------
FAKE_STATS = {
    "budget": 300,
    "policy": "h2o",
    "evicted_tokens": 5,
    "peak_blocks": 3,
    "peak_tokens": 300,
}


def _api_imports() -> dict[str, set[str]]:
    """{module of vllm_caote.api: the modules of vllm_caote.api it imports}, from the source."""
    from pathlib import Path

    import vllm_caote.api

    pkg = Path(vllm_caote.api.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in sorted(pkg.glob("*.py")):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    deps |= {node.module} if node.module else {a.name for a in node.names}
                elif node.level == 0 and (node.module or "").startswith("vllm_caote.api."):
                    deps.add(node.module.removeprefix("vllm_caote.api."))
            elif isinstance(node, ast.Import):
                deps |= {
                    a.name.removeprefix("vllm_caote.api.")
                    for a in node.names
                    if a.name.startswith("vllm_caote.api.")
                }
        graph[path.stem] = {d.split(".")[0] for d in deps}
    return graph


def test_api_modules_import_one_way():
    """server -> middleware -> state (and server -> state): no import cycle in the package, so
    the middleware does not depend on the build_app wrapper that installs it."""
    graph = _api_imports()
    assert graph["server"] >= {"middleware", "state"}
    assert "server" not in graph["middleware"] | graph["state"] | graph["params"]
    assert "middleware" not in graph["state"]

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(
            d == goal or (d not in seen and reaches(d, goal, seen | {d}))
            for d in graph.get(start, ())
        )

    cycles = [m for m in graph if m != "__init__" and reaches(m, m)]
    assert not cycles, f"import cycles through {cycles}: {graph}"


def _fake_app():
    """A Starlette app shaped like vLLM's: ``/v1/completions`` calls a wrapped ``generate``."""
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.middleware import Middleware

    from vllm_caote.api.middleware import KvEvictionMiddleware
    from vllm_caote.api.state import Runtime, _wrap_generate

    seen: list[dict[str, Any]] = []

    async def generate(body):
        yield SimpleNamespace(text="a", finished=False, kv_transfer_params=None)
        params = {"other": 1} if body.get("keep_other") else {}
        if body.get("vllm_xargs", {}).get("kv_budget"):
            params["kv_eviction"] = dict(FAKE_STATS)
        yield SimpleNamespace(text="b", finished=True, kv_transfer_params=params or None)

    wrapped = _wrap_generate(generate)
    app = FastAPI()

    async def completions(request):  # a plain Starlette endpoint
        body = await request.json()
        seen.append(body)
        outs = []
        if not body.get("stream"):
            async for out in wrapped(body):
                outs.append(out)
            return JSONResponse(
                {"choices": [{"text": "ab"}], "kv_transfer_params": outs[-1].kv_transfer_params}
            )

        async def events():
            yield ": keep-alive\n\n"
            async for out in wrapped(body):
                fin = "length" if out.finished else None
                yield f"data: {json.dumps({'choices': [{'text': out.text, 'finish_reason': fin}]})}\n\n"
            if body.get("n") == 2:  # a second choice finishing after the first
                yield f"data: {json.dumps({'choices': [{'index': 1, 'finish_reason': 'stop'}]})}\n\n"
            if body.get("stream_options"):
                yield f"data: {json.dumps({'choices': [], 'usage': {'total_tokens': 2}})}\n\n"
            yield "data: [DONE]\n\n"

        async def split(step: int):
            """The same stream cut every ``step`` bytes, events split across body messages."""
            raw = "".join([e async for e in events()]).encode()
            for i in range(0, len(raw), step):
                yield raw[i : i + step]

        stream = split(body["split"]) if body.get("split") else events()
        return StreamingResponse(stream, media_type="text/event-stream")

    app.add_route("/v1/completions", completions, methods=["POST"])

    runtime = Runtime()
    runtime.limits = _limits(0)
    app.user_middleware.append(Middleware(KvEvictionMiddleware, runtime=runtime))
    return app, seen


def test_middleware_in_process():
    from fastapi.testclient import TestClient

    app, seen = _fake_app()
    c = TestClient(app)
    # No budget, no default: the body reaches vLLM untouched and the response is stock.
    r = c.post("/v1/completions", json={"prompt": "x", "keep_other": True})
    assert seen[-1] == {"prompt": "x", "keep_other": True}
    assert r.json() == {"choices": [{"text": "ab"}], "kv_transfer_params": {"other": 1}}
    # Budgeted: forwarded in vllm_xargs; stats lifted out of kv_transfer_params.
    r = c.post("/v1/completions", json={"prompt": "x", "kv_budget": 300, "kv_policy": "H2O"})
    assert seen[-1] == {"prompt": "x", "vllm_xargs": {"kv_budget": 300, "kv_policy": "h2o"}}
    assert r.json()["kv_eviction"] == FAKE_STATS and r.json()["kv_transfer_params"] is None
    assert int(r.headers["content-length"]) == len(r.content)
    body = {"prompt": "x", "kv_budget": 300, "keep_other": True}
    r = c.post("/v1/completions", json=body)
    assert r.json()["kv_transfer_params"] == {"other": 1} and r.json()["kv_eviction"]
    # Rejected before the app sees it.
    n = len(seen)
    r = c.post("/v1/completions", json={"prompt": "x", "kv_budget": 1.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "kv_budget"
    assert len(seen) == n
    # Streams: stats in the final chunk only (the usage chunk when there is one).
    for usage in (False, True):
        body = {"prompt": "x", "kv_budget": 300, "stream": True}
        if usage:
            body["stream_options"] = {"include_usage": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            raw = "".join(r.iter_text())
        assert raw.startswith(": keep-alive\n\n") and raw.endswith("data: [DONE]\n\n")
        events = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]
        assert [("kv_eviction" in e) for e in events] == [False] * (len(events) - 1) + [True]
        assert (events[-1]["choices"] == []) is usage


def test_stream_stats_survive_events_split_across_messages():
    """However the body messages cut the SSE events, the stats land in the final event."""
    from fastapi.testclient import TestClient

    app, _seen = _fake_app()
    c = TestClient(app)
    for step, n in ((1, 1), (7, 2), (10_000, 2)):
        body = {"prompt": "x", "kv_budget": 300, "stream": True, "split": step, "n": n}
        with c.stream("POST", "/v1/completions", json=body) as r:
            raw = "".join(r.iter_text())
        events = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]
        assert [("kv_eviction" in e) for e in events] == [False] * n + [True], step
        assert events[-1]["kv_eviction"] == FAKE_STATS
        assert raw.startswith(": keep-alive\n\n") and raw.endswith("data: [DONE]\n\n")


# ---------------------------------------------------------------------------------------
# Helpers for the server tests
# ---------------------------------------------------------------------------------------
def _body(server, endpoint: str, max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    if endpoint == "chat":
        body = {"model": server.model, "messages": [{"role": "user", "content": "Say hi."}]}
    else:
        body = {"model": server.model, "prompt": "Hello, my name is"}
    body.update({"max_tokens": max_tokens, "temperature": 0.0, **extra})
    return body


def _post(server, endpoint: str, body: dict[str, Any], **kw: Any) -> requests.Response:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    return requests.post(server.url(path), json=body, timeout=TIMEOUT, **kw)


def _sse(resp: requests.Response) -> list[dict[str, Any]]:
    """The JSON ``data:`` events of a streamed response (``[DONE]`` must end it)."""
    events, done = [], False
    for line in resp.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            continue
        events.append(json.loads(payload))
    assert done, "stream did not end with [DONE]"
    return events


def _text(endpoint: str, obj: dict[str, Any]) -> str:
    choice = obj["choices"][0]
    return choice["message"]["content"] if endpoint == "chat" else choice["text"]


def _create(client, endpoint: str, stream: bool, **kw: Any):
    if endpoint == "chat":
        return client.chat.completions.create(
            messages=[{"role": "user", "content": "Say hi."}], stream=stream, **kw
        )
    return client.completions.create(prompt="Hello, my name is", stream=stream, **kw)


def _extra(obj: Any) -> dict[str, Any]:
    return dict(obj.model_extra or {})


def _logged_extra_args(server, request_id: str, timeout: float = 15.0) -> dict[str, Any] | None:
    """``SamplingParams.extra_args`` the front-end built for ``request_id`` (from the log)."""
    if server.log_path is None:
        pytest.skip("server log not available (external server without CAOTE_TEST_SERVER_LOG)")
    pat = re.compile(
        r"Received request \S*"
        + re.escape(request_id)
        + r"\S*: params: .*?extra_args=(None|\{.*?\})\)"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = pat.search(server.log_text())
        if m:
            return ast.literal_eval(m.group(1))
        time.sleep(0.2)
    raise AssertionError(f"request {request_id} not found in the server log")


@pytest.fixture(scope="module")
def info(caote_server) -> dict[str, Any]:
    r = requests.get(caote_server.url("/v1/kv_eviction/policies"), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def client(caote_server):
    import openai

    return openai.OpenAI(
        base_url=caote_server.api_url, api_key="EMPTY", max_retries=0, timeout=TIMEOUT
    )


# ---------------------------------------------------------------------------------------
# Happy paths through the OpenAI client
# ---------------------------------------------------------------------------------------
@pytest.mark.server
def test_policies_endpoint(info):
    from vllm_caote.config import settings

    s = settings()  # the shared server runs with the default sinks / window
    assert info["policies"] == policy_names()
    assert info["default_policy"] == DEFAULT_POLICY
    assert info["default_budget"] == DEFAULT_BUDGET
    assert isinstance(info["block_size"], int) and info["block_size"] > 0
    assert info["sink_tokens"] == s.sinks and info["window"] == s.window
    assert info["min_budget"] == s.sinks + s.window + info["block_size"]
    assert info["max_model_len"] == 4096


@pytest.mark.server
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_openai_client_extra_body(client, caote_server, endpoint, stream):
    rid = f"t-{uuid.uuid4().hex}"
    resp = _create(
        client,
        endpoint,
        stream,
        model=caote_server.model,
        max_tokens=6,
        temperature=0.0,
        extra_body={"kv_budget": 2048, "kv_policy": "TOVA"},
        extra_headers={"X-Request-Id": rid},
    )
    if stream:
        chunks = list(resp)
        text = "".join(
            (c.choices[0].delta.content or "") if endpoint == "chat" else c.choices[0].text
            for c in chunks
            if c.choices
        )
    else:
        text = resp.choices[0].message.content if endpoint == "chat" else resp.choices[0].text
    assert isinstance(text, str) and text
    # The front-end handed the engine explicit, canonical values.
    assert _logged_extra_args(caote_server, rid) == {"kv_budget": 2048, "kv_policy": "tova"}


@pytest.mark.server
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_vllm_xargs_path(client, caote_server, endpoint):
    rid = f"t-{uuid.uuid4().hex}"
    resp = _create(
        client,
        endpoint,
        False,
        model=caote_server.model,
        max_tokens=4,
        extra_body={"vllm_xargs": {"kv_budget": 300, "kv_policy": "h2o", "custom": "kept"}},
        extra_headers={"X-Request-Id": rid},
    )
    assert resp.choices
    assert _logged_extra_args(caote_server, rid) == {
        "custom": "kept",
        "kv_budget": 300,
        "kv_policy": "h2o",
    }


@pytest.mark.server
def test_defaults_reach_the_engine(caote_server):
    """No kv_budget: the server default goes out explicitly; kv_budget 0: eviction off."""
    rid = f"t-{uuid.uuid4().hex}"
    r = _post(
        caote_server,
        "completions",
        _body(caote_server, "completions"),
        headers={"X-Request-Id": rid},
    )
    assert r.status_code == 200, r.text
    assert _logged_extra_args(caote_server, rid) == {
        "kv_budget": DEFAULT_BUDGET,
        "kv_policy": DEFAULT_POLICY,
    }

    rid = f"t-{uuid.uuid4().hex}"
    body = _body(caote_server, "completions", kv_policy="keydiff")
    r = _post(caote_server, "completions", body, headers={"X-Request-Id": rid})
    assert r.status_code == 200, r.text
    assert _logged_extra_args(caote_server, rid) == {
        "kv_budget": DEFAULT_BUDGET,
        "kv_policy": "keydiff",
    }

    rid = f"t-{uuid.uuid4().hex}"
    body = _body(caote_server, "completions", kv_budget=0)
    r = _post(caote_server, "completions", body, headers={"X-Request-Id": rid})
    assert r.status_code == 200, r.text
    assert _logged_extra_args(caote_server, rid) == {"kv_budget": 0}
    data = r.json()
    assert "kv_eviction" not in data
    assert "kv_eviction" not in (data.get("kv_transfer_params") or {})


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------
# Symbolic values ("MIN-1", "MAX+1") are resolved from the policies endpoint.
BAD_BUDGETS = [
    (True, "integer"),
    (False, "integer"),
    (1.5, "integer"),
    (2048.0, "integer"),
    ("2048", "integer"),
    (-1, "negative"),
    (1, "minimum"),
    ("MIN-1", "minimum"),
    ("MAX+1", "max_model_len"),
    (2**64, "max_model_len"),
    ([2048], "integer"),
    ({"n": 2048}, "integer"),
]
BAD_POLICIES = [
    ("nope", "unknown"),
    ("", "unknown"),
    (3, "string"),
    (True, "string"),
    (["tova"], "string"),
    ({"p": "tova"}, "string"),
]


def _place(key: str, value: Any, where: str) -> dict[str, Any]:
    return {key: value} if where == "top" else {"vllm_xargs": {key: value}}


def _assert_400(r: requests.Response, param: str) -> str:
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "BadRequestError" and err["code"] == 400
    assert err["param"] == param
    return err["message"]


@pytest.mark.server
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("where", ["top", "xargs"])
@pytest.mark.parametrize("value,word", BAD_BUDGETS, ids=[repr(v)[:12] for v, _ in BAD_BUDGETS])
def test_bad_budget_is_400(caote_server, info, endpoint, where, value, word):
    lo, hi = info["min_budget"], info["max_model_len"]
    value = (
        {"MIN-1": lo - 1, "MAX+1": hi + 1}.get(value, value) if isinstance(value, str) else value
    )
    body = _body(caote_server, endpoint, **_place("kv_budget", value, where))
    param = "kv_budget" if where == "top" else "vllm_xargs.kv_budget"
    msg = _assert_400(_post(caote_server, endpoint, body), param)
    assert "kv_budget" in msg and f"[{lo}, {hi}]" in msg and word in msg, msg


@pytest.mark.server
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("where", ["top", "xargs"])
@pytest.mark.parametrize("value,word", BAD_POLICIES, ids=[repr(v)[:12] for v, _ in BAD_POLICIES])
def test_bad_policy_is_400(caote_server, endpoint, where, value, word):
    body = _body(caote_server, endpoint, kv_budget=2048, **_place("kv_policy", value, where))
    param = "kv_policy" if where == "top" else "vllm_xargs.kv_policy"
    msg = _assert_400(_post(caote_server, endpoint, body), param)
    assert "kv_policy" in msg and word in msg, msg
    assert all(name in msg for name in policy_names()), msg


@pytest.mark.server
@pytest.mark.parametrize("where", ["top", "xargs"])
def test_bad_recent_is_400(caote_server, where):
    param = "kv_recent" if where == "top" else "vllm_xargs.kv_recent"
    # the server has a default budget, so kv_recent alone is valid; with kv_budget 0 it is not
    for value, budget, word in ((1.5, 2048, "[0, 1]"), ("x", 2048, "number"), (0.5, 0, "kv_budget is 0")):  # fmt: skip
        body = _body(caote_server, "completions", kv_budget=budget, **_place("kv_recent", value, where))  # fmt: skip
        msg = _assert_400(_post(caote_server, "completions", body), param)
        assert "kv_recent" in msg and word in msg, msg
    body = _body(caote_server, "completions", **_place("kv_recent", 0.75, where))
    r = _post(caote_server, "completions", body)  # the server's default budget, this share
    assert r.status_code == 200 and r.json()["kv_eviction"]["budget"] == 1024, r.text


@pytest.mark.server
def test_conflicting_and_beam_search_are_400(caote_server):
    body = _body(caote_server, "completions", kv_budget=200, vllm_xargs={"kv_budget": 300})
    assert "both top-level" in _assert_400(_post(caote_server, "completions", body), "kv_budget")
    body = _body(caote_server, "completions", kv_budget=2048, use_beam_search=True, n=2)
    assert "use_beam_search" in _assert_400(_post(caote_server, "completions", body), "kv_budget")


@pytest.mark.server
def test_server_log_has_no_unknown_vllm_environment_variable(caote_server):
    """The plugin's environment fallback (CAOTE_*) is not a VLLM_* name vLLM warns about."""
    log = caote_server.log_text()
    if not log:
        pytest.skip("server log not available")
    assert "vllm-caote: KV eviction ready" in log  # the one self-configuration line
    assert "Unknown vLLM environment variable" not in log


@pytest.mark.server
def test_responses_endpoint_validates_and_honours_kv_budget(caote_server):
    """/v1/responses: the same vocabulary as the other endpoints (it forwards vllm_xargs)."""
    url = caote_server.url("/v1/responses")
    base = {"model": caote_server.model, "input": "Say hi.", "max_output_tokens": 4}
    _assert_400(requests.post(url, json={**base, "kv_budget": -1}, timeout=60), "kv_budget")
    _assert_400(requests.post(url, json={**base, "kv_policy": "lru"}, timeout=60), "kv_policy")
    long_input = "The quick brown fox jumps over the lazy dog. " * 120  # ~1.2k tokens
    r = requests.post(url, json={**base, "input": long_input, "kv_budget": 300}, timeout=300)
    assert r.status_code == 200, r.text
    assert "kv_eviction" in r.json(), r.text[:2000]
    stats = r.json()["kv_eviction"]
    assert stats["budget"] == 300 and stats["evicted_tokens"] > 0, stats
    # streamed: the stats ride in the response of the response.completed event
    body = {**base, "input": long_input, "kv_budget": 300, "stream": True}
    with requests.post(url, json=body, timeout=300, stream=True) as r:
        assert r.status_code == 200, r.text
        raw = r.content.decode()
    events = [e for e in raw.split("\n\n") if e.strip()]
    carrying = [e.split("\n", 1)[0] for e in events if '"kv_eviction"' in e]
    assert carrying == ["event: response.completed"], raw[-3000:]
    done = next(e for e in events if e.startswith("event: response.completed"))
    done = json.loads(done.split("\ndata: ", 1)[1])
    assert done["response"]["kv_eviction"]["evicted_tokens"] > 0, done["response"]


@pytest.mark.server
def test_error_format_matches_vllm_and_openai_client(caote_server, client):
    import openai

    # vLLM's own 400 for a bad sampling parameter, for comparison.
    theirs = _post(caote_server, "completions", _body(caote_server, "completions", temperature=-1))
    ours = _post(caote_server, "completions", _body(caote_server, "completions", kv_budget=-1))
    assert theirs.status_code == ours.status_code == 400
    t, o = theirs.json()["error"], ours.json()["error"]
    assert set(t) == set(o) and t["type"] == o["type"] and t["code"] == o["code"]
    assert theirs.headers["content-type"] == ours.headers["content-type"]

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model=caote_server.model, prompt="Hi", max_tokens=2, extra_body={"kv_budget": 7}
        )
    assert e.value.status_code == 400 and "kv_budget" in str(e.value)
    # ... and the server keeps serving.
    ok = client.completions.create(
        model=caote_server.model, prompt="Hi", max_tokens=2, extra_body={"kv_budget": 2048}
    )
    assert ok.choices[0].text is not None


@pytest.mark.server
def test_bad_requests_do_not_affect_good_ones(caote_server):
    good = [
        _body(caote_server, ep, max_tokens=8, kv_budget=2048) for ep in ("completions", "chat")
    ] * 2
    bad = [_body(caote_server, "completions", kv_budget=v) for v in (-5, 1.5, "x", True, 10**9, 3)]
    jobs = [("good", "chat" if "messages" in b else "completions", b) for b in good]
    jobs += [("bad", "completions", b) for b in bad]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda j: (j[0], j[1], _post(caote_server, j[1], j[2])), jobs))
    for kind, endpoint, r in results:
        if kind == "good":
            assert r.status_code == 200, r.text
            assert _text(endpoint, r.json())
        else:
            assert r.status_code == 400, r.text
    assert caote_server.alive()


# ---------------------------------------------------------------------------------------
# Eviction statistics (reported by the engine)
# ---------------------------------------------------------------------------------------
def _check_stats(stats: Any, budget: int, policy: str, info: dict[str, Any], usage=None) -> None:
    assert isinstance(stats, dict), stats
    assert STATS_FIELDS <= set(stats), stats
    assert stats["budget"] == budget and stats["policy"] == policy, stats
    for k in ("evicted_tokens", "peak_blocks", "peak_tokens"):
        assert type(stats[k]) is int and stats[k] >= 0, stats
    assert 0 < stats["peak_tokens"] <= stats["peak_blocks"] * info["block_size"], stats
    if usage is not None:
        assert stats["peak_tokens"] <= usage["total_tokens"], (stats, usage)
        assert stats["evicted_tokens"] < usage["total_tokens"], (stats, usage)


@pytest.mark.server
def test_stats_nonstream_long_prompt(caote_server, info):
    """A prompt longer than the budget: tokens are evicted, stats come back top-level."""
    budget = info["min_budget"]
    body = _body(caote_server, "completions", prompt=LONG_PROMPT, kv_budget=budget)
    body["kv_policy"] = "snapkv"
    r = _post(caote_server, "completions", body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["usage"]["prompt_tokens"] > 2 * budget
    _check_stats(data.get("kv_eviction"), budget, "snapkv", info, data["usage"])
    assert data["kv_eviction"]["evicted_tokens"] > 0, data["kv_eviction"]
    # Moved out of kv_transfer_params, which is dropped when nothing else is left in it.
    assert data.get("kv_transfer_params") is None


@pytest.mark.server
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stats_per_choice_with_n(caote_server, info, endpoint):
    """n > 1: every choice is its own engine request and carries its own stats; the top-level
    object is choice 0's."""
    budget = info["min_budget"]
    body = _body(caote_server, endpoint, max_tokens=6, kv_budget=budget, kv_policy="snapkv")
    if endpoint == "chat":
        body["messages"][0]["content"] = LONG_PROMPT
    else:
        body["prompt"] = LONG_PROMPT
    body.update(n=3, temperature=1.0, seed=7)
    r = _post(caote_server, endpoint, body)
    assert r.status_code == 200, r.text
    data = r.json()
    choices = sorted(data["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2]
    for c in choices:
        _check_stats(c.get("kv_eviction"), budget, "snapkv", info)
        assert c["kv_eviction"]["evicted_tokens"] > 0, c["kv_eviction"]
    assert data["kv_eviction"] == choices[0]["kv_eviction"]
    assert data.get("kv_transfer_params") is None


@pytest.mark.server
def test_stats_nonstream_chat(caote_server, info):
    body = _body(caote_server, "chat", kv_budget=info["min_budget"], kv_policy="caote-h2o")
    r = _post(caote_server, "chat", body)
    assert r.status_code == 200, r.text
    data = r.json()
    _check_stats(data.get("kv_eviction"), info["min_budget"], "caote-h2o", info, data["usage"])
    assert data.get("kv_transfer_params") is None


@pytest.mark.server
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("usage", [False, True], ids=["no_usage", "include_usage"])
def test_stats_stream_final_chunk(caote_server, info, endpoint, usage):
    body = _body(caote_server, endpoint, max_tokens=5, kv_budget=2048, stream=True)
    if usage:
        body["stream_options"] = {"include_usage": True}
    with _post(caote_server, endpoint, body, stream=True) as r:
        assert r.status_code == 200, r.text
        events = _sse(r)
    carrying = [i for i, ev in enumerate(events) if "kv_eviction" in ev]
    assert carrying == [len(events) - 1], f"stats must be in the final chunk only: {events}"
    final = events[-1]
    if usage:
        assert final["choices"] == [] and final["usage"]["completion_tokens"] >= 1
    else:
        assert final["choices"][0]["finish_reason"] is not None
    _check_stats(final["kv_eviction"], 2048, DEFAULT_POLICY, info)


@pytest.mark.server
def test_stats_openai_client(client, caote_server, info):
    resp = client.chat.completions.create(
        model=caote_server.model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        extra_body={"kv_budget": 512, "kv_policy": "fast-caote-tova"},
    )
    _check_stats(_extra(resp).get("kv_eviction"), 512, "fast-caote-tova", info)
    chunks = list(
        client.completions.create(
            model=caote_server.model,
            prompt="Hi",
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"kv_budget": 512},
        )
    )
    assert chunks[-1].usage is not None
    _check_stats(_extra(chunks[-1]).get("kv_eviction"), 512, DEFAULT_POLICY, info)


@pytest.mark.server
def test_stats_defaults(caote_server, info):
    """No kv_budget: the server default (1024) applies; kv_budget 0: no eviction at all."""
    r = _post(caote_server, "chat", _body(caote_server, "chat"))
    assert r.status_code == 200, r.text
    _check_stats(r.json().get("kv_eviction"), DEFAULT_BUDGET, DEFAULT_POLICY, info)

    r = _post(
        caote_server, "chat", _body(caote_server, "chat", kv_budget=0, stream=True), stream=True
    )
    with r:
        assert r.status_code == 200
        assert not any("kv_eviction" in ev for ev in _sse(r))


@pytest.mark.server
def test_stats_tell_own_tokens_from_shared_prefix_tokens(caote_server, info):
    """The same prompt twice with a budget, the second time after an unbudgeted request put it
    in vLLM's prefix cache: the first evicts its whole prompt down to the budget; the second
    reads the cached blocks whole (shared, not counted against the budget) and holds few
    tokens of its own, so it evicts nothing. The stats say which tokens were which."""
    bs, budget = info["block_size"], 512
    # ~1.8k tokens, as in the report that asked for this; the nonce: nothing of it is cached
    prompt = f"Session {uuid.uuid4().hex}. " + " ".join([LONG_PROMPT] * 5)

    def send(kv_budget: int) -> dict[str, Any]:
        body = _body(caote_server, "completions", max_tokens=4, prompt=prompt, kv_budget=kv_budget)
        r = _post(caote_server, "completions", body)
        assert r.status_code == 200, r.text
        return r.json()

    cold = send(budget)
    send(0)  # unbudgeted: its blocks go to the prefix cache
    warm = send(budget)
    n_prompt = warm["usage"]["prompt_tokens"]
    assert n_prompt > 2 * budget
    for data in (cold, warm):
        s = data["kv_eviction"]
        _check_stats(s, budget, DEFAULT_POLICY, info, data["usage"])
        assert s["shared_prefix_tokens"] == s["prefix_cached_tokens"], s  # the old name stays
        assert s["shared_prefix_blocks"] == s["shared_prefix_tokens"] // bs, s
        assert s["peak_tokens"] == s["shared_prefix_tokens"] + s["own_peak_tokens"], s
        assert s["peak_blocks"] == s["shared_prefix_blocks"] + s["own_peak_blocks"], s
    c, w = cold["kv_eviction"], warm["kv_eviction"]
    assert c["shared_prefix_tokens"] == 0 and c["evicted_tokens"] > 0, c
    # the user's report: peak_blocks near the prompt's, nothing evicted, by design
    assert w["shared_prefix_tokens"] >= n_prompt - 2 * bs, w
    assert w["evicted_tokens"] == 0 and w["own_peak_tokens"] < budget, w
    assert w["peak_blocks"] * bs >= n_prompt, w


# ---------------------------------------------------------------------------------------
# Fuzz: random JSON values never produce a 500
# ---------------------------------------------------------------------------------------
@pytest.mark.server
def test_fuzz_eviction_params(caote_server):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    json_scalar = st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70),
        st.integers(min_value=-10, max_value=5000),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
        st.booleans(),
        st.none(),
    )
    json_value = st.one_of(
        json_scalar,
        st.lists(json_scalar, max_size=3),
        st.dictionaries(st.text(max_size=4), json_scalar, max_size=2),
    )
    budget = st.one_of(json_value, st.integers(min_value=164, max_value=4096), st.just(0))
    policy = st.one_of(json_value, st.sampled_from(policy_names()))
    absent = object()

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        endpoint=st.sampled_from(["completions", "chat"]),
        b=st.one_of(st.just(absent), budget),
        p=st.one_of(st.just(absent), policy),
        where=st.sampled_from(["top", "xargs"]),
    )
    def run(endpoint, b, p, where):
        fields = {k: v for k, v in (("kv_budget", b), ("kv_policy", p)) if v is not absent}
        body = _body(caote_server, endpoint, max_tokens=1)
        if where == "top":
            body.update(fields)
        elif fields:
            body["vllm_xargs"] = fields
        r = _post(caote_server, endpoint, body)
        assert r.status_code in (200, 400), (r.status_code, r.text, body)
        if r.status_code == 400:
            assert r.json()["error"]["code"] == 400

    t0 = time.monotonic()
    run()
    assert time.monotonic() - t0 < 60
    assert caote_server.alive()
    r = _post(caote_server, "completions", _body(caote_server, "completions", kv_budget=2048))
    assert r.status_code == 200, r.text
