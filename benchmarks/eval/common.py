"""Helpers shared by ``python -m benchmarks.eval`` and ``python -m benchmarks``."""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval for ``k`` successes out of ``n``."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def resolve_model(model: str | None) -> str:
    """``None`` -> the embedded SmolLM2 folder; otherwise a local folder or a hub id."""
    if model:
        return model
    from vllm_caote.models import fetch_model

    return str(fetch_model())


def make_llm(
    model: str | None, max_model_len: int = 4096, kv_space_gib: str | None = None, **kwargs
):
    """An in-process vLLM engine with the plugin loaded (engine core in this process, so the
    scheduler can be read directly)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if kv_space_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_space_gib)
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    from vllm_caote.models import engine_dtype

    params = dict(
        dtype=engine_dtype(),
        model=resolve_model(model),
        max_model_len=max_model_len,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        distributed_executor_backend="uni",
    )
    params.update(kwargs)
    return LLM(**params)


def close_llm(llm) -> None:
    """Shut an in-process engine down now. Its teardown releases vLLM's process-wide
    distributed state; left to garbage collection it could run after the next engine in the
    same process has started, and pull that state from under it."""
    import gc

    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def block_size_of(llm) -> int:
    return scheduler_of(llm).cache_config.block_size


def min_budget_of(llm) -> int:
    from vllm_caote.config import settings

    return settings().min_budget(block_size_of(llm))


def environment() -> dict:
    """What the numbers were measured on (where they came from: :mod:`benchmarks.provenance`)."""
    import torch
    import vllm

    return {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "env": {
            k: v for k, v in os.environ.items() if k.startswith(("CAOTE_", "VLLM_CPU_KVCACHE"))
        },
    }


def sampling(max_tokens: int, budget: int | None = None, policy: str | None = None, **kw):
    from vllm import SamplingParams

    extra = {}
    if budget is not None:
        extra["kv_budget"] = int(budget)
        if policy is not None:
            extra["kv_policy"] = policy
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra or None, **kw)


def stats_of(output) -> dict | None:
    return (output.kv_transfer_params or {}).get("kv_eviction")


def write_results(out_dir: Path, tag: str, result: dict, render_md, plot=None) -> str:
    """Write ``<tag>.json`` first (nothing after it can lose the numbers), then the plots
    (skipped with a note if matplotlib, the ``bench`` extra, is missing), then ``<tag>.md``;
    both without this machine's paths (:func:`benchmarks.provenance.scrub`).
    ``plot(result, out_dir, tag)`` returns the files it wrote. Returns the Markdown."""
    import json
    import sys

    from benchmarks.provenance import scrub

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{tag}.json"
    json_path.write_text(scrub(json.dumps(result, indent=1, default=str)))
    if plot is not None:
        try:
            result["plots"] = plot(result, out_dir, tag)
        except ImportError as e:
            result["plots"] = []
            result.setdefault("notes", []).append(
                f"no plots: {e} (pip install 'vllm-caote[bench]')"
            )
            print(f"note: plots skipped ({e}); results are in {json_path}", file=sys.stderr)
        json_path.write_text(scrub(json.dumps(result, indent=1, default=str)))
    md = scrub(render_md(result))
    (out_dir / f"{tag}.md").write_text(md)
    return md


class Driver:
    """Adds requests to the in-process engine and steps it, timing every step."""

    def __init__(self, llm):
        self.llm = llm
        self.engine = llm.llm_engine
        self.sched = scheduler_of(llm)
        self.n = 0
        self.preemptions: dict[str, int] = {}  # request -> times vLLM preempted it

    def add(self, prompt_ids, params) -> str:
        self.n += 1
        rid = f"bench-{self.n}"
        self.engine.add_request(rid, {"prompt_token_ids": prompt_ids}, params)
        return rid

    def blocks_evicted(self) -> dict[str, int]:
        return {rid: st.evicted_total for rid, st in self.sched.caote.requests.items()}

    def run(self, max_steps: int | None = None, on_step=None) -> dict:
        """Step until done (or ``max_steps``; the rest is aborted). Returns per-step records."""
        steps, finished = [], {}
        while self.engine.has_unfinished_requests():
            running = list(self.sched.running)
            decode_only = (
                bool(running)
                and not self.sched.waiting
                and all(r.num_computed_tokens >= r.num_prompt_tokens for r in running)
            )
            ev_before = self.blocks_evicted()
            t0 = time.perf_counter()
            outs = self.engine.step()
            dt = time.perf_counter() - t0
            ev_after = self.blocks_evicted()
            for o in outs:
                if o.finished:
                    finished[o.request_id] = o
                    ev_after.pop(o.request_id, None)
            evicted = sum(max(0, ev_after.get(r, 0) - v) for r, v in ev_before.items())
            rec = dict(
                dt=dt,
                running=len(self.sched.running),
                waiting=len(self.sched.waiting),
                batch=len(running),
                decode_only=decode_only,
                evicted_tokens=evicted,
                free_blocks=self.sched.kv_cache_manager.block_pool.get_num_free_blocks(),
            )
            steps.append(rec)
            for r in list(self.sched.running) + list(self.sched.waiting):
                self.preemptions[r.request_id] = r.num_preemptions
            if on_step:
                on_step(rec)
            if max_steps is not None and len(steps) >= max_steps:
                left = [r.request_id for r in list(self.sched.running) + list(self.sched.waiting)]
                if left:
                    self.engine.abort_request(left)
                    while self.engine.has_unfinished_requests():
                        self.engine.step()
                break
        return dict(steps=steps, finished=finished)
