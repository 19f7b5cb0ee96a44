"""The report of :mod:`benchmarks.gpu_kernels`: the issue's target read off the run, and the
Markdown table written beside the JSON."""

from __future__ import annotations

import platform
import sys
from typing import TYPE_CHECKING

import torch

from benchmarks import provenance

if TYPE_CHECKING:
    from benchmarks.gpu_kernels import Shape


def environment(device: torch.device) -> dict:
    import vllm_caote

    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "vllm_caote": vllm_caote.__version__,
        "vllm_imported": any(m == "vllm" or m.startswith("vllm.") for m in sys.modules),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(
            device_name=p.name,
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
        )
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def target_result(report: dict, shape: Shape, device: torch.device) -> dict:
    rows = [r for r in report["evictions"] if r["context"] == 32768]
    applicable = device.type == "cuda" and shape.is_llama_8b() and bool(rows)
    per_policy = {}
    for r in rows:
        worst = per_policy.get(r["policy"], 0.0)
        per_policy[r["policy"]] = max(worst, r["ratio_to_decode"])
    return {
        "applicable": applicable,
        "why_not": None
        if applicable
        else "needs --device cuda, the default 8B shapes (bf16) and a 32768-token context",
        "worst_ratio_per_policy": per_policy,
        "met_per_policy": {p: v < 1.0 for p, v in per_policy.items()} if applicable else None,
    }


def render_md(report: dict) -> str:
    env, shape = report["env"], report["shape"]
    lines = [
        "# Eviction kernels vs decode attention (`python -m benchmarks.gpu_kernels`)",
        "",
        *provenance.markdown(report),
        f"Device: {env['device']} ({env.get('device_name')}), torch {env['torch']}, "
        f"CUDA {env['cuda']}. Shape: {shape['layers']} layers, {shape['kv_heads']} KV heads, "
        f"{shape['q_heads']} query heads, head {shape['head_size']}, {shape['dtype']}, "
        f"blocks of {shape['block_size']}, window {shape['window']}, sinks {shape['sinks']}.",
        "",
        "One eviction = every layer of one request through the engine's `evict.compact_layer`: "
        "gather + score + select + compact in place. Decode = SDPA of one token over the same full cache, every layer "
        "(contiguous K/V). Times: median ms.",
        "",
        "| context | decode ms/step | decode ms/layer | form |",
        "|---:|---:|---:|---|",
    ]
    for d in report["decode"]:
        lines.append(
            f"| {d['context']} | {d['ms_per_step']:.3f} | {d['ms_per_layer']:.4f} | {d['form']} |"
        )
    lines += [
        "",
        "| context | budget | policy | ms/eviction | ms/layer | min ms | runs | x decode "
        "| check (overlap) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["evictions"]:
        c = r["check"]
        lines.append(
            f"| {r['context']} | {r['budget']} | {r['policy']} | {r['ms_per_eviction']:.3f} | "
            f"{r['ms_per_layer']:.4f} | {r['ms_min']:.3f} | {r['repeats']} | "
            f"{r['ratio_to_decode']:.2f} | {'ok' if c['passed'] else 'FAILED'} "
            f"({c['overlap_min']:.4f}) |"
        )
    if report.get("batched"):
        lines += [
            "",
            "Batched: several rows evicting in one layer through one `compact_layer` call (one "
            "padded scoring call), vs one decode step's attention of the same rows over that "
            "layer. Scratch: measured peak rise on CUDA, else the stated bound.",
            "",
            "| context | rows | policy | ms/layer | decode ms/layer | x decode | scratch MiB |",
            "|---:|---:|---|---:|---:|---:|---:|",
        ]
        for b in report["batched"]:
            sc = b["scratch"]
            mib = sc.get("measured_bytes", sc["bound_bytes"]) / 2**20
            lines.append(
                f"| {b['context']} | {b['rows']} | {b['policy']} | {b['ms_per_layer']:.3f} | "
                f"{b['decode_ms_per_layer']:.4f} | {b['ratio_to_decode']:.2f} | {mib:.1f} |"
            )
    cor = report["correctness"]
    tr = report["target_result"]
    lines += [
        "",
        f"Correctness: {'passed' if cor['passed'] else 'FAILED'} ({cor['checks']} checks, "
        f"min overlap {cor['overlap_min']}, indices identical everywhere: "
        f"{cor['indices_equal_all']}).",
        "",
        f"Target ({report['target']}): "
        + (
            ", ".join(
                f"{p} {'met' if ok else 'missed'} ({tr['worst_ratio_per_policy'][p]:.2f}x)"
                for p, ok in tr["met_per_policy"].items()
            )
            if tr["applicable"]
            else f"not applicable here ({tr['why_not']})"
        )
        + ".",
    ]
    if report["skipped"]:
        lines += ["", f"Skipped (time limit): {len(report['skipped'])} configurations."]
    lines += ["", f"Wall time {report['wall_s']} s.", ""]
    return "\n".join(lines)
