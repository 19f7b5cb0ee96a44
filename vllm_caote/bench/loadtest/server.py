"""The load test's server: loopback-only URLs, and a real vLLM OpenAI server it starts and stops."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path


def check_loopback(url: str) -> str:
    u = urllib.parse.urlparse(url)
    host = u.hostname or ""
    ok = host == "localhost"
    if not ok:
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
    if not ok or u.scheme not in ("http", "https"):
        raise SystemExit(f"refusing {url!r}: the load test only talks to a loopback server")
    return url.rstrip("/")


# --- server -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, log_path: Path):
    """The `make serve` command (same flags), plus ``--server-args``, on a free port."""
    from vllm_caote.bench.eval.common import resolve_model
    from vllm_caote.models import engine_dtype

    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        resolve_model(args.model),
        "--served-model-name",
        args.served_model_name or "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--gpu-memory-utilization",
        "0.3",
        "--dtype",
        engine_dtype(),
        *args.server_args.split(),
    ]
    env = dict(os.environ)
    env.setdefault("CAOTE_DEFAULT_POLICY", "caote-snapkv")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return proc, url, cmd
        except OSError:
            pass
        time.sleep(2)
    stop_server(proc)
    raise SystemExit(f"server not healthy after 600 s; see {log_path}")


def stop_server(proc) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# --- client -----------------------------------------------------------------------------------
