"""The load test's server: loopback-only URLs, and a real vLLM OpenAI server it starts and stops."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
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
    from benchmarks.eval.common import resolve_model
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


@contextlib.contextmanager
def serving(args, log_path: Path):
    """The server a load-test part talks to: with ``args.start_server`` one started by
    :func:`start_server` (stopped on exit, whatever happens), else ``args.url`` (loopback
    only). Yields ``(url, server_cmd)``; ``server_cmd`` is None for a server you started."""
    proc = None
    try:
        if args.start_server:
            proc, url, cmd = start_server(args, log_path)
        else:
            url, cmd = check_loopback(args.url), None
        yield url, cmd
    finally:
        stop_server(proc)


# --- client -----------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})?\s+([0-9.eE+-]+|NaN|[+-]Inf)\s*$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> ``{sample name: value summed over its label sets}``
    (``vllm:num_requests_running``, ``vllm_caote:eviction_seconds_sum``, ...)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def scrape_metrics(url: str) -> dict[str, float]:
    """The server's ``/metrics``, through :func:`parse_metrics`."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        return parse_metrics(r.read().decode())
