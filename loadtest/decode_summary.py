"""The decode-heavy benchmark's bookkeeping (:mod:`loadtest.decode`): budgets
from compression ratios, the pure-decode intervals of the ``/metrics`` samples, per-configuration
summaries, ratios against stock and the issue's targets. Pure functions of the samples
(``tests/harness/test_harness.py``)."""

from __future__ import annotations

import itertools
import math
import statistics

#: the issue's targets (#20): output tokens/s and concurrency vs stock, eviction time share
TARGETS = {
    "8x": dict(output_tokens_per_s_ratio=3.0, mean_running_ratio=4.0, peak_running_ratio=4.0,
               eviction_share_decode=0.05),
    "4x": dict(output_tokens_per_s_ratio=2.0),
}  # fmt: skip


def parse_compressions(s: str) -> list[float]:
    out = [float(x) for x in s.split(",") if x.strip()]
    if any(c <= 1 for c in out):
        raise ValueError(f"compressions must be > 1, got {s!r}")
    return out


def label_of(compression: float | None) -> str:
    return "stock" if compression is None else f"{compression:g}x"


def budget_for(
    prompt_tokens: int,
    output_tokens: int,
    compression: float,
    block_size: int,
    min_budget: int,
    slack: int = 128,
) -> dict:
    """The budget at ``compression`` of the final sequence length, as the plugin takes it:
    an integer >= ``min_budget`` (sinks + window + one block), kept as whole blocks; decoding,
    a request grows ``slack`` tokens (the ``eviction_slack`` setting, whole blocks, at least
    one) past them before it evicts back."""
    seq = prompt_tokens + output_tokens
    want = math.ceil(seq / compression)
    budget = max(want, min_budget)
    keep = math.ceil(budget / block_size) * block_size
    return dict(
        compression=compression,
        sequence_tokens=seq,
        budget=budget,
        clamped=want < min_budget,
        keep=keep,
        kept_compression=seq / keep,
        # the plugin's bound once the prompt is in
        cap_blocks=keep // block_size + max(math.ceil(slack / block_size), 1),
    )


def pool_holds(pool_blocks: int, blocks_each: int) -> int:
    """Requests of ``blocks_each`` blocks that fit in the pool at once."""
    return pool_blocks // max(blocks_each, 1)


def window(samples: list[dict], lo: float, hi: float) -> list[dict]:
    return [s for s in samples if lo <= s["t"] <= hi]


def middle_half(samples: list[dict], wall: float) -> dict:
    """Rates over the middle half of the run (``[wall/4, 3 wall/4]``), after the first
    admissions and before the last requests drain, prefills included. The engine is busy
    throughout, so the window's length is the sum of its step times."""
    w = window(samples, wall / 4, 3 * wall / 4)
    if len(w) < 2 or w[-1]["t"] <= w[0]["t"]:
        return dict(seconds=0.0, samples=len(w))
    a, b = w[0], w[-1]
    dt = b["t"] - a["t"]
    steps = b["steps"] - a["steps"]
    ev = b["eviction_s"] - a["eviction_s"]
    return dict(
        seconds=dt,
        samples=len(w),
        mean_running=statistics.fmean(s["running"] for s in w),
        output_tokens_per_s=(b["generation_tokens"] - a["generation_tokens"]) / dt,
        steps=steps,
        step_ms=1000 * dt / steps if steps else None,
        eviction_s=ev,
        evictions=b["evictions"] - a["evictions"],
        eviction_share=ev / dt,
        eviction_ms_per_step=1000 * ev / steps if steps else None,
    )


def is_decode_interval(a: dict, b: dict) -> bool:
    """Between polls ``a`` and ``b`` the engine ran only decode steps, with requests waiting:
    it stepped, the same requests ran throughout and each produced one token per step (a
    request in prefill, being recomputed after a preemption, finishing or newly admitted
    breaks the equality), and no prompt was finished."""
    steps = b["steps"] - a["steps"]
    return (
        a["waiting"] > 0
        and steps > 0
        and a["running"] == b["running"] > 0
        and b["generation_tokens"] - a["generation_tokens"] == steps * a["running"]
        and b["prompt_tokens"] == a["prompt_tokens"]
    )


def decode_steady_state(samples: list[dict]) -> dict:
    """Rates over the run's pure-decode poll intervals with requests waiting
    (:func:`is_decode_interval`): the pool, not the request count, limits concurrency there,
    their summed length is decode-step time, and the eviction time in them is decode-time
    eviction only (a prompt's own eviction comes in a step that finishes a prompt)."""
    dt = steps = gen = ev = events = run_t = 0.0
    n = 0
    for a, b in itertools.pairwise(samples):
        if not is_decode_interval(a, b):
            continue
        d = b["t"] - a["t"]
        n += 1
        dt += d
        run_t += d * a["running"]
        steps += b["steps"] - a["steps"]
        gen += b["generation_tokens"] - a["generation_tokens"]
        ev += b["eviction_s"] - a["eviction_s"]
        events += b["evictions"] - a["evictions"]
    if not n or dt <= 0:
        return dict(seconds=0.0, intervals=0)
    return dict(
        seconds=dt,
        intervals=n,
        mean_running=run_t / dt,
        output_tokens_per_s=gen / dt,
        steps=steps,
        step_ms=1000 * dt / steps,
        eviction_s=ev,
        evictions=events,
        eviction_share=ev / dt,
        eviction_ms_per_step=1000 * ev / steps,
    )


def ratio(x: float | None, base: float | None) -> float | None:
    if x is None or not base:
        return None
    return x / base


def add_ratios(configs: list[dict]) -> None:
    """``<key>_ratio`` = the configuration's value over stock's (``configs[0]``)."""
    stock = configs[0]
    for c in configs:
        for key in ("output_tokens_per_s", "requests_per_s", "peak_running", "mean_running",
                    "tpot_p50_ms", "ttft_p50_s"):  # fmt: skip
            c[f"{key}_ratio"] = ratio(c.get(key), stock.get(key))
        for part in ("middle", "decode"):
            for key in ("mean_running", "output_tokens_per_s"):
                c[part][f"{key}_ratio"] = ratio(c[part].get(key), stock[part].get(key))


def check_targets(configs: list[dict], targets: dict = TARGETS) -> list[dict]:
    """One row per target: ratios must reach theirs, the eviction share stay at or below."""
    by = {c["label"]: c for c in configs}
    rows = []
    for label, want in targets.items():
        c = by.get(label)
        for key, target in want.items():
            if key == "eviction_share_decode":
                value = None if c is None else c["decode"].get("eviction_share")
                met = value is not None and value <= target
            else:
                value = None if c is None else c.get(key)
                met = value is not None and value >= target
            rows.append(dict(config=label, metric=key, target=target, value=value, met=met))
    return rows


def summarize_config(label, budget_info, outs, wall, samples, before, after) -> dict:
    """One configuration's numbers from its client outputs, /metrics polls and counters."""
    from loadtest import _latency_stats

    lat = _latency_stats(outs)
    busy = [s["running"] for s in samples if s["running"] > 0]
    return dict(
        label=label,
        **(budget_info or dict(compression=None, budget=None, keep=None)),
        **lat,
        wall_s=wall,
        output_tokens_per_s=lat["output_tokens"] / wall,
        requests_per_s=lat["ok"] / wall,
        peak_running=max((s["running"] for s in samples), default=0),
        mean_running=statistics.fmean(busy) if busy else 0.0,
        peak_waiting=max((s["waiting"] for s in samples), default=0),
        preemptions=after["preemptions"] - before["preemptions"],
        # budgeted requests' tokens computed again after vLLM preempted them
        recomputed_tokens=after.get("recomputed_tokens", 0) - before.get("recomputed_tokens", 0),
        prefix_cache_hits=after["prefix_cache_hits"] - before["prefix_cache_hits"],
        evictions=after["evictions"] - before["evictions"],
        evicted_tokens=after["evicted_tokens"] - before["evicted_tokens"],
        eviction_s=after["eviction_s"] - before["eviction_s"],
        eviction_share=(after["eviction_s"] - before["eviction_s"]) / wall,
        middle=middle_half(samples, wall),
        decode=decode_steady_state(samples),
        error_samples=[(o.error or "")[-300:] for o in outs if not o.success][:3],
        samples=samples,
    )


def ppl_fractions(infos: list[dict]) -> list[float]:
    """The eval's ``--budgets`` (fractions of the context) that give exactly these budgets."""
    return [i["budget"] / i["sequence_tokens"] for i in infos]
