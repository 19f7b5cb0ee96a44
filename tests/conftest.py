"""Session fixtures, shared by every test folder (the helpers they use: ``helpers/``).

``caote_server`` (session scope) starts ONE real vLLM OpenAI server, with this plugin loaded
through its ``vllm.general_plugins`` entry point, on the embedded SmolLM2 model, and keeps it
for the whole session. Use it from any test module::

    @pytest.mark.server
    def test_something(caote_server):
        requests.get(caote_server.url("/health"))

The server is started with stock vLLM flags only (prefix caching and async scheduling left at
vLLM's defaults: the plugin configures itself), with :data:`~helpers.servers.SERVER_CONFIG`
passed through vLLM's ``--additional-config`` (a default policy and a default budget, so tests
can check that defaults apply) and ``--enable-log-requests`` (so tests can read the
``SamplingParams`` the front-end built from ``caote_server.log_path``).

Set ``CAOTE_TEST_SERVER_URL=http://host:port`` to run the tests against a server you
started yourself (with the same settings) instead; ``log_path`` is then None unless
``CAOTE_TEST_SERVER_LOG`` names its log file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import missing
from helpers.servers import (
    MAX_MODEL_LEN,
    SERVER_CONFIG,
    CaoteServer,
    _wait_healthy,
    own_server,
)


@pytest.fixture(scope="session")
def caote_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaoteServer]:
    """One real vLLM OpenAI server (plugin loaded) for the whole test session."""
    external = os.environ.get("CAOTE_TEST_SERVER_URL", "").strip().rstrip("/")
    if external:
        log = os.environ.get("CAOTE_TEST_SERVER_LOG")
        server = CaoteServer(base_url=external, log_path=Path(log) if log else None)
        _wait_healthy(server, 30.0)
        yield server
        return

    from vllm_caote.models import model_dir

    model = model_dir()
    if not (model / "config.json").exists():
        missing(
            f"embedded model at {model}", "make setup-serve, or python -m vllm_caote.models fetch"
        )

    flags = [
        "--gpu-memory-utilization", "0.3", "--additional-config", json.dumps(SERVER_CONFIG),
        "--max-model-len", str(MAX_MODEL_LEN), "--enable-log-requests",
    ]  # fmt: skip
    # CAOTE_WINDOW: the default, through the environment fallback
    with own_server(tmp_path_factory.mktemp("vllm_server"), *flags, kv_space_gib="2",
                    env={"CAOTE_WINDOW": "32"}) as server:  # fmt: skip
        yield server
