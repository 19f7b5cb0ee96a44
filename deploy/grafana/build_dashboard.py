#!/usr/bin/env python3
"""Generate the Grafana dashboard ``deploy/grafana/dashboards/vllm-caote.json``.

Built with Grafana's own SDK (PyPI ``grafana-foundation-sdk``, in the ``dev`` extra)::

    .venv/bin/python deploy/grafana/build_dashboard.py           # (re)write the JSON
    .venv/bin/python deploy/grafana/build_dashboard.py --check   # exit 1 if it is stale
    .venv/bin/python deploy/grafana/build_dashboard.py --stdout  # print it

Every query reads the Prometheus datasource chosen in the ``$datasource`` variable (the
provisioned one, ``deploy/grafana/provisioning/datasources/prometheus.yml``, by default). ``$model_name`` is a dashboard
variable (vLLM's ``model_name`` label); ``$__rate_interval`` is Grafana's. The plugin's
metrics are described in :mod:`vllm_caote.metrics` and the README's "Metrics and dashboard" section;
``tests/server/test_metrics.py`` evaluates every query here against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_m
from grafana_foundation_sdk.models import dashboard as dash_m

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "dashboards" / "vllm-caote.json"
UID = "vllm-caote"
TITLE = "vLLM CAOTE: KV-cache eviction"
#: every panel reads the Prometheus picked in the `datasource` variable (any uid works)
DATASOURCE = dash_m.DataSourceRef(type_val="prometheus", uid="${datasource}")

SEL = 'model_name=~"$model_name"'  # every query is filtered by the model variable
RI = "$__rate_interval"
#: compression ratios come once per finished request: a longer window than $__rate_interval
RATIO_WINDOW = "5m"


@dataclass
class Query:
    expr: str
    legend: str


@dataclass
class PanelSpec:
    title: str
    description: str
    queries: list[Query]
    unit: str = "short"
    stacked: bool = False
    minimum: float | None = 0
    max_value: float | None = None
    width: int = 12


def _quantiles(metric: str, qs: tuple[float, ...], by: str, window: str) -> list[Query]:
    by_clause = f"le, {by}" if by else "le"
    legend_by = f" {{{{{by}}}}}" if by else ""
    return [
        Query(
            f"histogram_quantile({q}, sum by ({by_clause}) (rate({metric}_bucket{{{SEL}}}[{window}])))",
            f"p{round(q * 100)}{legend_by}",
        )
        for q in qs
    ]


def rows() -> list[tuple[str, list[PanelSpec]]]:
    """The dashboard's content: (row title, panels), in order."""
    kv = [
        PanelSpec(
            "KV cache blocks: used / total",
            "Blocks of vLLM's paged KV-cache pool in use and in the pool "
            "(vllm_caote:kv_blocks_used, vllm_caote:kv_blocks_total; the null block excluded, "
            "as in vllm:kv_cache_usage_perc).",
            [
                Query(f"sum(vllm_caote:kv_blocks_used{{{SEL}}})", "used"),
                Query(f"sum(vllm_caote:kv_blocks_total{{{SEL}}})", "total"),
            ],
        ),
        PanelSpec(
            "KV cache blocks by request kind",
            "Blocks in use, split between requests with a KV budget (budgeted: their cache is "
            "capped at ceil(budget/block_size) + ceil(eviction_slack/block_size) blocks) and all "
            "other requests "
            "(unbudgeted). Stacked: the two add up to the used blocks.",
            [Query(f"sum by (kind) (vllm_caote:kv_blocks_used_by{{{SEL}}})", "{{kind}}")],
            stacked=True,
        ),
        PanelSpec(
            "KV cache occupancy and budgeted share",
            "Used / total blocks (as vLLM's vllm:kv_cache_usage_perc) and the share of the used "
            "blocks that budgeted requests hold.",
            [
                Query(
                    f"sum(vllm_caote:kv_blocks_used{{{SEL}}}) / "
                    f"clamp_min(sum(vllm_caote:kv_blocks_total{{{SEL}}}), 1)",
                    "occupancy (used / total)",
                ),
                Query(
                    f'sum(vllm_caote:kv_blocks_used_by{{{SEL}, kind="budgeted"}}) / '
                    f"clamp_min(sum(vllm_caote:kv_blocks_used{{{SEL}}}), 1)",
                    "budgeted share of used",
                ),
                Query(f"avg(vllm:kv_cache_usage_perc{{{SEL}}})", "vllm:kv_cache_usage_perc"),
            ],
            unit="percentunit",
            max_value=1,
            width=24,
        ),
    ]
    eviction = [
        PanelSpec(
            "Eviction rate: tokens/s",
            "KV tokens evicted per second from budgeted requests' caches, by policy "
            "(rate of vllm_caote:evicted_tokens_total).",
            [
                Query(
                    f"sum by (policy) (rate(vllm_caote:evicted_tokens_total{{{SEL}}}[{RI}]))",
                    "{{policy}}",
                )
            ],
        ),
        PanelSpec(
            "Eviction rate: events/s",
            "Evictions per second (one budgeted request compacting its cache back to its "
            "budget), by policy (rate of vllm_caote:eviction_events_total).",
            [
                Query(
                    f"sum by (policy) (rate(vllm_caote:eviction_events_total{{{SEL}}}[{RI}]))",
                    "{{policy}}",
                )
            ],
        ),
        PanelSpec(
            "Eviction latency p50 / p99",
            "Time one eviction spends scoring the cached tokens and compacting the kept ones, "
            "summed over all layers, measured in the worker (vllm_caote:eviction_seconds), by "
            "policy. It is added to the step the eviction happens in.",
            _quantiles("vllm_caote:eviction_seconds", (0.5, 0.99), "policy", RI),
            unit="s",
        ),
        PanelSpec(
            "Compression ratio p50 / p90",
            "Finished budgeted requests: tokens seen / tokens kept in the KV cache at the end "
            f"(vllm_caote:request_compression_ratio), by policy, over {RATIO_WINDOW} windows. "
            "1 = nothing was evicted.",
            _quantiles("vllm_caote:request_compression_ratio", (0.5, 0.9), "policy", RATIO_WINDOW),
            unit="x",
            minimum=1,
        ),
        PanelSpec(
            "Blocks freed by eviction /s",
            "KV-cache blocks eviction gives back to the pool per second "
            "(rate of vllm_caote:blocks_freed_total).",
            [Query(f"sum(rate(vllm_caote:blocks_freed_total{{{SEL}}}[{RI}]))", "blocks freed/s")],
        ),
        PanelSpec(
            "Prefix-cache reuse by budgeted requests: tokens/s",
            "Prompt tokens finished budgeted requests read from the prefix cache instead of "
            "computing them (rate of vllm_caote:prefix_cached_tokens_total), by policy. These "
            "shared blocks are kept whole; the budget bounds the rest.",
            [
                Query(
                    f"sum by (policy) (rate(vllm_caote:prefix_cached_tokens_total{{{SEL}}}[{RI}]))",
                    "{{policy}}",
                )
            ],
        ),
        PanelSpec(
            "Conversations resumed from kept caches",
            "Tokens budgeted requests took from the kept compacted cache of their conversation's "
            "previous turn instead of computing them (rate of vllm_caote:resumed_tokens_total, "
            "by policy), tokens they computed again after vLLM preempted them (rate of "
            "vllm_caote:recomputed_tokens_total, by policy: a preempted request resumes from "
            "what is left of its own kept cache), and the blocks kept caches hold "
            "(vllm_caote:kept_session_blocks: cached free blocks vLLM reclaims when it needs "
            "them).",
            [
                Query(
                    f"sum by (policy) (rate(vllm_caote:resumed_tokens_total{{{SEL}}}[{RI}]))",
                    "resumed tokens/s {{policy}}",
                ),
                Query(
                    f"sum by (policy) (rate(vllm_caote:recomputed_tokens_total{{{SEL}}}[{RI}]))",
                    "recomputed after preemption tokens/s {{policy}}",
                ),
                Query(f"sum(vllm_caote:kept_session_blocks{{{SEL}}})", "kept blocks"),
            ],
        ),
        PanelSpec(
            "Budgeted requests running",
            "Running requests with a KV budget, by policy (vllm_caote:budgeted_requests_running), "
            "next to all running requests (vllm:num_requests_running).",
            [
                Query(
                    f"sum by (policy) (vllm_caote:budgeted_requests_running{{{SEL}}})",
                    "budgeted {{policy}}",
                ),
                Query(f"sum(vllm:num_requests_running{{{SEL}}})", "all running"),
            ],
        ),
    ]
    serving = [
        PanelSpec(
            "Throughput: tokens/s",
            "Prompt tokens prefilled and tokens generated per second "
            "(vllm:prompt_tokens_total, vllm:generation_tokens_total).",
            [
                Query(f"sum(rate(vllm:prompt_tokens_total{{{SEL}}}[{RI}]))", "prompt"),
                Query(f"sum(rate(vllm:generation_tokens_total{{{SEL}}}[{RI}]))", "generation"),
            ],
        ),
        PanelSpec(
            "Time to first token p50 / p99",
            "vLLM's TTFT histogram (vllm:time_to_first_token_seconds).",
            _quantiles("vllm:time_to_first_token_seconds", (0.5, 0.99), "", RI),
            unit="s",
        ),
        PanelSpec(
            "Time per output token p50 / p99",
            "vLLM's per-request TPOT histogram (vllm:request_time_per_output_token_seconds: "
            "decode time / output tokens of each finished request).",
            _quantiles("vllm:request_time_per_output_token_seconds", (0.5, 0.99), "", RI),
            unit="s",
        ),
        PanelSpec(
            "Preemptions /s",
            "Requests vLLM preempted (KV pool exhausted) per second, rate of "
            "vllm:num_preemptions_total. Budgeted prompts are admitted by what they will hold, so "
            "this should stay at zero when eviction is what keeps the pool from filling.",
            [Query(f"sum(rate(vllm:num_preemptions_total{{{SEL}}}[{RI}]))", "preemptions/s")],
        ),
        PanelSpec(
            "Requests running / waiting",
            "vllm:num_requests_running and vllm:num_requests_waiting.",
            [
                Query(f"sum(vllm:num_requests_running{{{SEL}}})", "running"),
                Query(f"sum(vllm:num_requests_waiting{{{SEL}}})", "waiting"),
            ],
        ),
    ]
    return [("KV cache", kv), ("Eviction", eviction), ("vLLM serving", serving)]


def _panel(spec: PanelSpec) -> ts_b.Panel:
    panel = (
        ts_b.Panel()
        .title(spec.title)
        .description(spec.description)
        .datasource(DATASOURCE)
        .unit(spec.unit)
        .height(8)
        .span(spec.width)
        .line_width(1)
        .fill_opacity(25 if spec.stacked else 10)
        .show_points(common_m.VisibilityMode.NEVER)
        .legend(
            common_b.VizLegendOptions()
            .display_mode(common_m.LegendDisplayMode.LIST)
            .placement(common_m.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            common_b.VizTooltipOptions()
            .mode(common_m.TooltipDisplayMode.MULTI)
            .sort(common_m.SortOrder.DESCENDING)
        )
    )
    if spec.minimum is not None:
        panel = panel.min(spec.minimum)
    if spec.max_value is not None:
        panel = panel.max(spec.max_value)
    if spec.stacked:
        panel = panel.stacking(common_b.StackingConfig().mode(common_m.StackingMode.NORMAL))
    for i, q in enumerate(spec.queries):
        panel = panel.with_target(
            prom_b.Dataquery()
            .expr(q.expr)
            .legend_format(q.legend)
            .ref_id(chr(ord("A") + i))
            .datasource(DATASOURCE)
            .range()
        )
    return panel


def build() -> dict:
    """The dashboard as a JSON-ready dict."""
    datasource_var = dash_b.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
    model_var = (
        dash_b.QueryVariable("model_name")
        .label("model")
        .datasource(DATASOURCE)
        .query("label_values(vllm:num_requests_running, model_name)")
        .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dash_m.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dash_m.VariableOption(selected=True, text="All", value="$__all"))
    )
    builder = (
        dash_b.Dashboard(TITLE)
        .uid(UID)
        .description(
            "vLLM with the vllm-caote KV-eviction plugin: KV-cache occupancy, eviction "
            "activity and cost, compression, next to vLLM's own serving metrics."
        )
        .tags(["vllm", "vllm-caote", "kv-cache"])
        .editable()
        .timezone("browser")
        .time("now-30m", "now")
        .refresh("10s")
        .tooltip(dash_m.DashboardCursorSync.CROSSHAIR)
        .with_variable(datasource_var)
        .with_variable(model_var)
    )
    for title, panels in rows():
        builder = builder.with_row(dash_b.Row(title))
        for spec in panels:
            builder = builder.with_panel(_panel(spec))
    return json.loads(json.dumps(builder.build(), cls=JSONEncoder))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel in a dashboard JSON."""
    out = []
    for panel in dashboard.get("panels", []):
        for sub in [panel, *panel.get("panels", [])]:
            for target in sub.get("targets", []) or []:
                if target.get("expr"):
                    out.append((sub.get("title", ""), target["expr"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if the JSON file is stale")
    mode.add_argument("--stdout", action="store_true", help="print instead of writing")
    args = ap.parse_args(argv)
    text = render()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT} ({len(panel_queries(json.loads(text)))} queries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
