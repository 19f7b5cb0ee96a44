"""Render the Grafana dashboard's panels to one PNG from a real Prometheus, with matplotlib.

No Grafana server is needed: every timeseries panel of ``dashboards/vllm-caote.json`` is drawn
from its own PromQL queries (``query_range`` over the window), with Grafana's variables expanded
as Grafana would (``$model_name``, ``$__rate_interval``), in the dashboard's layout.

    python deploy/grafana/render_png.py --prometheus http://127.0.0.1:9090 --minutes 15 \\
        --out docs/dashboard.png

``scripts/dashboard-png.sh`` produces the README's picture end to end: server, Prometheus,
load test, then this script.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

DASHBOARD = Path(__file__).parent / "dashboards" / "vllm-caote.json"


def query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    qs = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prom}/api/v1/query_range?{qs}", timeout=60) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus rejected {expr!r}: {body}")
    return body["data"]["result"]


def expand(expr: str, model: str, rate_interval: str) -> str:
    """Grafana's variables, as Grafana expands them for one model."""
    return expr.replace("$__rate_interval", rate_interval).replace("$model_name", re.escape(model))


def legend(fmt: str | None, labels: dict) -> str:
    if not fmt:
        return ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out += [p] if p.get("type") != "row" else []
        out += [q for q in p.get("panels", []) if q.get("type") != "row"]
    return out


def render(dashboard: dict, prom: str, model: str, start: float, end: float, out: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    ps = [p for p in panels(dashboard) if p.get("targets")]
    step = max(2.0, (end - start) / 300)
    rate_interval = f"{int(max(4 * step, 15))}s"
    cols = 2
    rows = -(-len(ps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(16, 3.0 * rows), squeeze=False)
    drawn = 0
    for ax, p in zip(axes.flat, ps, strict=False):
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit")
        for t in p["targets"]:
            for series in query_range(
                prom, expand(t["expr"], model, rate_interval), start, end, step
            ):
                xs = [datetime.fromtimestamp(float(ts)) for ts, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=legend(t.get("legendFormat"), series["metric"]))
                drawn += 1
        ax.set_title(p["title"], fontsize=10, loc="left")
        if unit:
            ax.set_ylabel(unit, fontsize=8)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(ps) :]:
        ax.axis("off")
    span = f"{datetime.fromtimestamp(start):%H:%M:%S}-{datetime.fromtimestamp(end):%H:%M:%S}"
    fig.suptitle(f"{dashboard['title']} - model {model}, {span} (rendered from Prometheus)")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    return drawn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prometheus", default="http://127.0.0.1:9090")
    p.add_argument("--model", default="smollm2", help="the model_name label (served name)")
    p.add_argument("--minutes", type=float, default=15.0, help="window ending now")
    p.add_argument("--start", type=float, default=None, help="window start (unix seconds)")
    p.add_argument("--dashboard", type=Path, default=DASHBOARD)
    p.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    args = p.parse_args(argv)
    end = time.time()
    start = args.start if args.start is not None else end - 60 * args.minutes
    dashboard = json.loads(args.dashboard.read_text())
    n = render(dashboard, args.prometheus.rstrip("/"), args.model, start, end, args.out)
    print(f"{args.out}: {n} series from {args.prometheus}")
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
