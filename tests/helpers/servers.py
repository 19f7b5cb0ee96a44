"""Real OpenAI servers for tests: the session's shared one is started by the
``caote_server`` fixture (``tests/conftest.py``) with :func:`own_server`, which tests also call
for a server of their own with other flags; :func:`stock_greedy` runs stock vLLM (plugin
disabled) in its own process for the no-op invariant (``stock_generate.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import missing

SERVED_MODEL = "smollm2"
MAX_MODEL_LEN = 4096
STARTUP_TIMEOUT_S = 300.0
#: The plugin settings the shared server runs with (``--additional-config``).
SERVER_CONFIG = {"kv_eviction": {"default_policy": "caote-snapkv", "default_budget": 1024}}


@dataclass
class CaoteServer:
    """A running OpenAI server: where it listens and where it logs."""

    base_url: str  # e.g. http://127.0.0.1:41234 (no trailing slash, no /v1)
    model: str = SERVED_MODEL
    max_model_len: int = MAX_MODEL_LEN
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        """Base URL for the OpenAI client (``.../v1``)."""
        return self.base_url + "/v1"

    def url(self, path: str) -> str:
        return self.base_url + path

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def alive(self) -> bool:
        import urllib.request

        if self.process is not None and self.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(self.url("/health"), timeout=5) as r:
                return r.status == 200
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(server: CaoteServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise RuntimeError(
                f"vLLM server exited with code {server.process.returncode} during start-up; "
                f"log tail ({server.log_path}):\n{server.log_tail()}"
            )
        if server.alive():
            return
        time.sleep(1.0)
    raise RuntimeError(
        f"vLLM server not healthy after {timeout:.0f} s; log tail ({server.log_path}):\n"
        f"{server.log_tail()}"
    )


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its engine process (they share the session we created)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def stock_greedy(cases: list[dict], tmp_path: Path) -> list[list[int]]:
    """Greedy token ids of stock vLLM (plugin disabled, its own process) for
    ``[{"prompt_token_ids": [...], "max_tokens": n}, ...]`` (``tests/helpers/stock_generate.py``)."""
    inp, out = tmp_path / "stock_in.json", tmp_path / "stock_out.json"
    inp.write_text(json.dumps(cases))
    env = dict(os.environ, CAOTE_DISABLE="1", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("stock_generate.py")), str(inp), str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@contextlib.contextmanager
def own_server(
    log_dir: Path, *flags: str, kv_space_gib: str | None = None, env: dict | None = None
):
    """A real OpenAI server of the test's own (the embedded model, eager, fp32 on CPU, the
    plugin from its entry point) with extra vLLM ``flags``, no ``CAOTE_*`` variable but those
    in ``env``; stopped on exit."""
    from vllm_caote.models import engine_dtype, model_dir

    model = model_dir()
    if not (model / "config.json").exists():
        missing("the embedded model", "make setup-serve")
    port = _free_port()
    log_path = log_dir / "server.log"
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAOTE_")}
    if kv_space_gib is not None:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", kv_space_gib)
    env.update(extra)
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", SERVED_MODEL, "--dtype", engine_dtype(), "--enforce-eager",
        "--host", "127.0.0.1", "--port", str(port), *flags,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = CaoteServer(base_url=f"http://127.0.0.1:{port}", log_path=log_path, process=proc)
    try:
        _wait_healthy(server, STARTUP_TIMEOUT_S)
        yield server
    finally:
        _stop(proc)
