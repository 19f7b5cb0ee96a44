"""Metrics (issue 5): ``vllm_caote:*`` on vLLM's ``/metrics`` and the Grafana dashboard.

* Unit tests (no server): the payload's trip engine core -> front-end through vLLM's own msgpack
  codec, the front-end guard, the exporter in prometheus_client's multiprocess mode, the
  dashboard JSON (generated, up to date, datasource picked by a ``$datasource`` variable).
* Server tests use the session's one real server (``caote_server``, conftest.py): budgeted and
  unbudgeted requests go in while a real Prometheus (Debian's ``prometheus``, installed by
  scripts/system-deps.sh; without it the two Prometheus tests fail in CI and skip elsewhere)
  scrapes the server every second; then ``/metrics`` must carry our
  metrics with values that agree with the requests' own ``kv_eviction`` stats, and EVERY query
  of every dashboard panel must parse and return data in Prometheus.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
import yaml
from helpers import missing
from prometheus_client.parser import text_string_to_metric_families

from vllm_caote import metrics as m
from vllm_caote.metrics.engine import (
    PAYLOAD_VERSION,
    attach_payload,
    compression_ratio,
    split_timings,
    take_payload,
)

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "vllm-caote.json"
BUILD_SCRIPT = GRAFANA / "build_dashboard.py"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
TIMEOUT = 240
DEFAULT_POLICY = "caote-snapkv"  # the shared server's CAOTE_DEFAULT_POLICY
VLLM_METRICS = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:request_time_per_output_token_seconds_bucket",
    "vllm:num_preemptions_total",
]


def _payload(**over) -> dict:
    p = {
        "v": PAYLOAD_VERSION,
        "policies": ["snapkv"],
        "blocks_total": 100,
        "blocks_used": 10,
        "blocks_budgeted": 4,
        "blocks_unbudgeted": 6,
        "running": {"snapkv": 1},
        "evicted_tokens": {"snapkv": 170},
        "eviction_events": {"snapkv": 1},
        "blocks_freed": 3,
        "eviction_seconds": [["snapkv", 0.02]],
        "compression_ratio": [["snapkv", 2.5]],
        "prefix_cached_tokens": {"snapkv": 256},
    }
    p.update(over)
    return p


# ---------------------------------------------------------------------------------------
# Unit tests (no server)
# ---------------------------------------------------------------------------------------
def test_compression_ratio():
    assert compression_ratio({"tokens_seen": 700, "evicted_tokens": 500, "budget": 164}) == 3.5
    assert compression_ratio({"tokens_seen": 100, "evicted_tokens": 0, "budget": 512}) == 1.0
    # preempted and recomputed: evicted counts twice; the cache still held min(seen, budget)
    assert compression_ratio({"tokens_seen": 400, "evicted_tokens": 900, "budget": 200}) == 2.0
    assert compression_ratio({"tokens_seen": 0, "evicted_tokens": 0, "budget": 200}) is None


def test_split_timings_per_request():
    # 3 layers x 2 evicting requests, layer-major
    assert split_timings([1, 10, 2, 20, 3, 30], ["a", "b"]) == [["a", 6.0], ["b", 60.0]]
    assert split_timings([1, 2, 3], ["a", "b"]) == [["a", 3.0], ["b", 3.0]]
    assert split_timings([1.5], []) == [["unknown", 1.5]]
    assert split_timings([], ["a"]) == []


def _fake_scheduler():
    """Just the parts of CaoteScheduler (``.caote``, the manager's ``num_held_blocks``) that
    EngineMetrics reads."""
    from types import SimpleNamespace as NS

    from vllm_caote.engine.scheduler import RequestBudget

    manager = NS(req_to_blocks={"a": [1, 2, 3], "b": [4, 5], "u": [6, 7, 8, 9]})
    pool = NS(num_gpu_blocks=101, get_num_free_blocks=lambda: 90)  # 10 used of 100
    ev = NS(
        requests={
            "a": RequestBudget(164, 256, "snapkv", evicted_total=100, events=1),
            "b": RequestBudget(300, 384, "h2o"),
        },
        finished_stats=[],
        freed_blocks_total=4,
        settings=NS(default_policy=DEFAULT_POLICY),
    )
    sched = NS(
        caote=ev,
        running=[NS(request_id="a"), NS(request_id="u")],
        kv_cache_manager=NS(
            num_held_blocks=lambda rid: len(manager.req_to_blocks.get(rid, ())), block_pool=pool
        ),
    )
    return sched, ev


def test_engine_payload_deltas():
    from vllm_caote.metrics.engine import EngineMetrics

    sched, ev = _fake_scheduler()
    em = EngineMetrics(sched)
    p = em.payload()
    assert p["policies"] == sorted([DEFAULT_POLICY, "snapkv", "h2o"])
    assert (p["blocks_total"], p["blocks_used"]) == (100, 10)
    assert (p["blocks_budgeted"], p["blocks_unbudgeted"]) == (5, 5)
    assert p["running"] == {DEFAULT_POLICY: 0, "snapkv": 1, "h2o": 0}
    assert p["evicted_tokens"]["snapkv"] == 100 and p["eviction_events"]["snapkv"] == 1
    assert p["blocks_freed"] == 4
    # nothing new: zero deltas, same gauges
    p = em.payload()
    assert p["evicted_tokens"]["snapkv"] == 0 and p["blocks_freed"] == 0
    # "a" evicts again, then finishes: only the increment is shipped, plus its ratio
    ev.requests["a"].evicted_total, ev.requests["a"].events = 150, 2
    st = ev.requests.pop("a").stats() | {"tokens_seen": 450, "prefix_cached_tokens": 128}
    ev.finished_stats.append(st)
    em.ingest_output(type("Out", (), {m.OUTPUT_ATTR: [["snapkv", 0.25]]})())
    p = em.payload()
    assert p["evicted_tokens"]["snapkv"] == 50 and p["eviction_events"]["snapkv"] == 1
    assert p["compression_ratio"] == [["snapkv", 1.5]]
    assert p["prefix_cached_tokens"] == {"snapkv": 128}
    assert p["eviction_seconds"] == [["snapkv", 0.25]]
    assert ev.finished_stats == []  # drained
    p = em.payload()
    assert p["evicted_tokens"]["snapkv"] == 0 and p["compression_ratio"] == []


def test_payload_survives_vllm_codec_and_guard():
    """Engine core -> front-end: through vLLM's msgpack codec, out before vLLM's loggers."""
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    for connector in (None, {"num_successful_transfers": 2}):
        stats = SchedulerStats(num_running_reqs=1, kv_connector_stats=connector)
        attach_payload(stats, _payload())
        wire = MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=stats))
        got = MsgpackDecoder(EngineCoreOutputs).decode(wire).scheduler_stats
        assert take_payload(got) == _payload()
        assert got.kv_connector_stats == connector  # a real connector's stats are untouched
        assert take_payload(got) == _payload()  # idempotent (kept as an attribute)


def test_stat_logger_entry_point():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="vllm.stat_logger_plugins")}
    assert eps.get("caote") == "vllm_caote.metrics.logger:CaoteStatLogger", (
        "entry point missing: run `.venv/bin/pip install -e . --no-deps`"
    )
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase

    from vllm_caote.metrics.logger import CaoteStatLogger

    assert issubclass(CaoteStatLogger, AggregateStatLoggerBase)


_MP_CHILD = textwrap.dedent(
    """
    import json, sys
    from vllm_caote.metrics.exporter import CaoteMetrics
    CaoteMetrics().observe(json.loads(sys.argv[1]), ["m", "0"])
    """
)


def test_exporter_multiprocess_mode(tmp_path):
    """Two front-end processes (api-server-count 2): counters add up, gauges keep the latest."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for blocks_used in (10, 20):
        payload = json.dumps(_payload(blocks_used=blocks_used))
        subprocess.run([sys.executable, "-c", _MP_CHILD, payload], env=env, check=True, timeout=120)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    fams = _families(generate_latest(registry).decode())
    lbl = {"model_name": "m", "engine": "0"}
    assert _value(fams, m.KV_BLOCKS_USED, lbl) == 20  # mostrecent
    assert _value(fams, m.EVICTED_TOKENS + "_total", {**lbl, "policy": "snapkv"}) == 340
    assert _value(fams, m.BLOCKS_FREED + "_total", lbl) == 6
    assert _value(fams, m.EVICTION_SECONDS + "_count", {**lbl, "policy": "snapkv"}) == 2
    assert _value(fams, m.COMPRESSION_RATIO + "_sum", {**lbl, "policy": "snapkv"}) == 5.0
    assert _value(fams, m.PREFIX_CACHED_TOKENS + "_total", {**lbl, "policy": "snapkv"}) == 512


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_json_is_generated_and_current():
    try:
        import grafana_foundation_sdk  # noqa: F401
    except ImportError:
        missing("grafana-foundation-sdk", "PyPI, in the dev extra")
    proc = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--check"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, (
        proc.stderr + "\n(regenerate with deploy/grafana/build_dashboard.py)"
    )


def test_dashboard_content():
    d = _dashboard()
    assert d["uid"] == "vllm-caote" and "__inputs" not in d
    titles = [p["title"] for p in d["panels"] if p["type"] != "row"]
    for want in (
        "KV cache blocks: used / total",
        "KV cache blocks by request kind",
        "KV cache occupancy and budgeted share",
        "Eviction rate: tokens/s",
        "Eviction rate: events/s",
        "Eviction latency p50 / p99",
        "Compression ratio p50 / p90",
        "Blocks freed by eviction /s",
        "Budgeted requests running",
        "Throughput: tokens/s",
        "Time to first token p50 / p99",
        "Time per output token p50 / p99",
        "Requests running / waiting",
        "Preemptions /s",
    ):
        assert want in titles
    exprs = " ".join(e for _, e in _panel_queries(d))
    for name in list(m.EXPORTED) + VLLM_METRICS:
        base = name.removesuffix("_bucket")
        assert base in exprs, f"no panel shows {name}"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model_name"]["datasource"]["uid"] == "${datasource}"
    for panel in d["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"


def test_docs_describe_every_metric():
    # the operators' reference is docs/metrics.md
    text = (ROOT / "docs" / "metrics.md").read_text()
    for name in m.EXPORTED:
        assert f"`{name}`" in text, f"docs/metrics.md does not describe {name}"


def test_promtool_check_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool", "Debian package prometheus: scripts/system-deps.sh, run by make setup")
    proc = subprocess.run(
        [promtool, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------
# Against the real server (and a real Prometheus)
# ---------------------------------------------------------------------------------------
def _families(text: str) -> dict[str, list[tuple[dict, float]]]:
    """sample name -> [(labels, value)] from a Prometheus text exposition."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def _value(fams, name: str, labels: dict | None = None) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    labels = labels or {}
    return sum(
        v for lbl, v in fams.get(name, []) if all(lbl.get(k) == x for k, x in labels.items())
    )


def _scrape(server) -> dict:
    r = requests.get(server.url("/metrics"), timeout=30)
    r.raise_for_status()
    return _families(r.text)


def _panel_queries(d: dict) -> list[tuple[str, str]]:
    out = []
    for panel in d.get("panels", []):
        for sub in [panel, *panel.get("panels", [])]:
            for t in sub.get("targets", []) or []:
                if t.get("expr"):
                    out.append((sub["title"], t["expr"]))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """Our own Prometheus on a free loopback port, scraping the test server every second."""

    def __init__(self, binary: str, target: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="caote-prom-"))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = self.dir / "prometheus.yml"
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "vllm",
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = open(self.dir / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_tail(self) -> str:
        self.log.flush()
        return (self.dir / "prometheus.log").read_text(errors="replace")[-3000:]

    def query(self, expr: str) -> dict:
        r = requests.get(self.url + "/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"Prometheus rejected {expr!r}: {r.status_code} {body}")
        return body["data"]

    def wait_target_up(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_tail()}")
            try:
                res = self.query('up{job="vllm"}')["result"]
                if res and res[0]["value"][1] == "1":
                    return
                last = res
            except (requests.RequestException, AssertionError) as e:
                last = e
            time.sleep(0.5)
        raise RuntimeError(f"Prometheus never scraped the server: {last}\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# (kv_budget, kv_policy or None for the server default, prompt tokens ~)
BUDGETED = [(164, "snapkv", 430), (256, None, 600), (512, None, 690)]
UNBUDGETED = [300, 300]
MAX_TOKENS = 12
SENTENCE = "The {i}th quick brown fox jumps over the lazy dog near the old mill. "  # ~17 tokens


def _prompt(tokens: int, seed: int) -> str:
    return "".join(SENTENCE.format(i=seed * 100 + i) for i in range(max(tokens // 17, 1)))


@dataclass
class Traffic:
    before: dict
    after: dict
    stats: list[dict]  # the budgeted responses' kv_eviction objects
    usages: list[dict]
    peak: dict[str, float] = field(default_factory=dict)  # gauges' max seen while running
    started: float = 0.0
    prometheus: Prometheus | None = None


def _complete(server, body: dict) -> dict:
    r = requests.post(server.url("/v1/completions"), json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def traffic(caote_server):
    """Start Prometheus (if installed), then send budgeted + unbudgeted requests at once."""
    binary = shutil.which("prometheus")
    prom = None
    if binary is not None:
        prom = Prometheus(binary, urlparse(caote_server.base_url).netloc)
    try:
        if prom is not None:
            prom.wait_target_up()
        before = _scrape(caote_server)
        bodies = []
        for i, (budget, policy, n) in enumerate(BUDGETED):
            body = {"kv_budget": budget, **({"kv_policy": policy} if policy else {})}
            bodies.append((body, n, i))
        # unbudgeted requests decode longer, so the 0.5 s poller sees their blocks even on a
        # loaded machine (their short prompts alone can finish between two polls)
        bodies += [
            ({"kv_budget": 0, "max_tokens": 6 * MAX_TOKENS}, n, 10 + i)
            for i, n in enumerate(UNBUDGETED)
        ]

        peak: dict[str, float] = {}
        done = threading.Event()

        def poll():
            keys = {
                "budgeted_running": (m.BUDGETED_RUNNING, {}),
                "blocks_budgeted": (m.KV_BLOCKS_USED_BY, {"kind": m.KIND_BUDGETED}),
                "blocks_unbudgeted": (m.KV_BLOCKS_USED_BY, {"kind": m.KIND_UNBUDGETED}),
                "blocks_used": (m.KV_BLOCKS_USED, {}),
            }
            while not done.is_set():
                try:
                    fams = _scrape(caote_server)
                except requests.RequestException:
                    continue
                for k, (name, lbl) in keys.items():
                    peak[k] = max(peak.get(k, 0.0), _value(fams, name, lbl))
                done.wait(0.5)

        started = time.time()
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        with ThreadPoolExecutor(len(bodies)) as ex:
            futs = [
                ex.submit(
                    _complete,
                    caote_server,
                    {
                        "model": caote_server.model,
                        "prompt": _prompt(n, seed),
                        "max_tokens": MAX_TOKENS,
                        "temperature": 0,
                        **extra,
                    },
                )
                for extra, n, seed in bodies
            ]
            results = [f.result() for f in futs]
        done.set()
        poller.join(timeout=30)
        stats = [r["kv_eviction"] for r in results[: len(BUDGETED)]]
        usages = [r["usage"] for r in results]
        # The front-end records each step's stats right after its outputs: allow a moment.
        want = sum(s["eviction_events"] for s in stats)
        deadline = time.monotonic() + 20
        while True:
            after = _scrape(caote_server)
            got = _value(after, m.EVICTION_EVENTS + "_total") - _value(
                before, m.EVICTION_EVENTS + "_total"
            )
            if got >= want or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        yield Traffic(before, after, stats, usages, peak, started, prom)
    finally:
        if prom is not None:
            prom.stop()


def _delta(t: Traffic, name: str, labels: dict | None = None) -> float:
    return _value(t.after, name, labels) - _value(t.before, name, labels)


@pytest.mark.server
def test_metrics_endpoint_values(traffic, caote_server):
    t = traffic
    fams = t.after
    for name in m.EXPORTED:
        sample = name + "_count" if m.EXPORTED[name] == "histogram" else name
        assert sample in fams, f"{sample} missing from /metrics"
    for name in VLLM_METRICS:
        assert name in fams, f"vLLM's own {name} missing from /metrics"
    lbl = {"model_name": caote_server.model}
    labels, _ = fams[m.KV_BLOCKS_USED][0]
    assert labels == {"model_name": caote_server.model, "engine": "0"}

    # every request evicted: prompts are longer than the budgets
    assert all(s["evicted_tokens"] > 0 and s["eviction_events"] > 0 for s in t.stats), t.stats
    by_policy: dict[str, list[dict]] = {}
    for s in t.stats:
        by_policy.setdefault(s["policy"], []).append(s)
    assert set(by_policy) == {"snapkv", DEFAULT_POLICY}
    for policy, ss in by_policy.items():
        pl = {**lbl, "policy": policy}
        # the counters agree exactly with what the requests themselves report
        assert _delta(t, m.EVICTED_TOKENS + "_total", pl) == sum(s["evicted_tokens"] for s in ss)
        assert _delta(t, m.EVICTION_EVENTS + "_total", pl) == sum(s["eviction_events"] for s in ss)
        # one timing per eviction, measured in the worker
        assert _delta(t, m.EVICTION_SECONDS + "_count", pl) == sum(s["eviction_events"] for s in ss)
        secs = _delta(t, m.EVICTION_SECONDS + "_sum", pl)
        assert 0 < secs < 120, secs
        # one ratio per finished budgeted request, > 1 since each one evicted
        assert _delta(t, m.COMPRESSION_RATIO + "_count", pl) == len(ss)
        want = sum(compression_ratio(s) for s in ss)
        assert _delta(t, m.COMPRESSION_RATIO + "_sum", pl) == pytest.approx(want)
        assert want > len(ss)
    assert _delta(t, m.BLOCKS_FREED + "_total", lbl) > 0

    total = _value(fams, m.KV_BLOCKS_TOTAL, lbl)
    assert total > 0 and 0 <= _value(fams, m.KV_BLOCKS_USED, lbl) <= total
    budgeted = _value(fams, m.KV_BLOCKS_USED_BY, {**lbl, "kind": m.KIND_BUDGETED})
    unbudgeted = _value(fams, m.KV_BLOCKS_USED_BY, {**lbl, "kind": m.KIND_UNBUDGETED})
    assert budgeted + unbudgeted == _value(fams, m.KV_BLOCKS_USED, lbl)
    assert _value(fams, m.BUDGETED_RUNNING, lbl) == 0  # all done
    # seen while the requests ran
    assert t.peak.get("budgeted_running", 0) >= 1, t.peak
    assert t.peak.get("blocks_budgeted", 0) >= 1, t.peak
    assert t.peak.get("blocks_unbudgeted", 0) >= 1, t.peak
    assert t.peak.get("blocks_used", 0) <= total
    # vLLM's own metrics still count (and our payload did not upset its loggers)
    prompt_tokens = sum(u["prompt_tokens"] for u in t.usages)
    assert _delta(t, "vllm:prompt_tokens_total", lbl) >= prompt_tokens
    assert _delta(t, "vllm:generation_tokens_total", lbl) >= MAX_TOKENS * len(t.usages)
    if caote_server.log_path is not None:
        log = caote_server.log_text()
        assert "vllm-caote metrics:" not in log, "a metrics hook failed; see the server log"


def _substitute(expr: str, model: str, window_s: int) -> str:
    """Grafana's variables, as Grafana would expand them for this server and time range."""
    expr = expr.replace("$__rate_interval", f"{window_s}s")
    return expr.replace("$model_name", re.escape(model))


@pytest.mark.server
def test_dashboard_queries_in_prometheus(traffic, caote_server):
    if traffic.prometheus is None:
        missing(
            "prometheus", "Debian package prometheus: scripts/system-deps.sh, run by make setup"
        )
    prom = traffic.prometheus
    time.sleep(3)  # a few more scrapes after the last request
    window = int(time.time() - traffic.started) + 15
    queries = _panel_queries(_dashboard())
    assert len(queries) >= 20
    failures = []
    for title, expr in queries:
        q = _substitute(expr, caote_server.model, window)
        data = prom.query(q)  # raises if it does not parse
        values = [float(r["value"][1]) for r in data["result"]]
        if not any(math.isfinite(v) for v in values):
            failures.append(f"{title}: {q} -> {data['result']}")
    assert not failures, "panels without data:\n" + "\n".join(failures)


@pytest.mark.server
def test_dashboard_renders_from_prometheus(traffic, caote_server, tmp_path):
    """docs/metrics.md's dashboard picture comes from this renderer: every panel, real series."""
    if traffic.prometheus is None:
        missing(
            "prometheus", "Debian package prometheus: scripts/system-deps.sh, run by make setup"
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        missing("matplotlib", "PyPI, in the dev and bench extras")
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_png", GRAFANA / "render_png.py")
    render_png = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_png)
    dashboard = _dashboard()
    assert render_png.expand('x{m=~"$model_name"}[$__rate_interval]', "a.b", "30s") == (
        'x{m=~"a\\.b"}[30s]'
    )
    assert render_png.legend("{{policy}} p50", {"policy": "h2o"}) == "h2o p50"
    out = tmp_path / "dashboard.png"
    start = traffic.started - 30
    drawn = render_png.render(
        dashboard, traffic.prometheus.url, caote_server.model, start, time.time(), out
    )
    panels = [p for p in render_png.panels(dashboard) if p.get("targets")]
    assert drawn >= len(panels), (drawn, len(panels))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
