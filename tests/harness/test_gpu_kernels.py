"""``python -m benchmarks.gpu_kernels`` (issue #20): the GPU kernel benchmark without vLLM.

It must run with torch alone (vLLM blocked at import), measure the engine's own per-layer
eviction (not a copy of it), and its correctness check must catch a broken eviction. CI runs
it here on CPU with tiny shapes; on a GPU the same code times the 8B shapes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from benchmarks import gpu_kernels as gk
from vllm_caote.config import EvictionSettings
from vllm_caote.engine import compaction
from vllm_caote.scoring import get_policy, policy_names

# Runs the module as `python -m` would, with every `import vllm...` raising; exits 3 if
# anything even tried to import vLLM (a caught ImportError would otherwise go unnoticed).
NO_VLLM = textwrap.dedent(
    """
    import importlib.abc, runpy, sys

    tried = []

    class NoVllm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "vllm" or name.startswith("vllm."):
                tried.append(name)
                raise ImportError(f"vllm is blocked in this test: {name}")
            return None

    sys.meta_path.insert(0, NoVllm())
    sys.argv = ["gpu_kernels", *sys.argv[1:]]
    try:
        runpy.run_module("benchmarks.gpu_kernels", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code
    if tried:
        print("tried to import vllm:", tried, file=sys.stderr)
        sys.exit(3)
    sys.exit(code)
    """
)

TINY_CONTEXTS, TINY_BUDGETS = gk.TINY_CONTEXTS, gk.TINY_BUDGETS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_kernels") / "tiny.json"
    proc = subprocess.run(
        [sys.executable, "-c", NO_VLLM, "--tiny", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, out


def test_tiny_run_needs_only_torch(tiny):
    proc, out = tiny
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.exists() and out.with_suffix(".md").exists()
    report = json.loads(out.read_text())
    assert report["env"]["vllm_imported"] is False
    assert "| context | budget | policy |" in out.with_suffix(".md").read_text()


def test_tiny_report_shape_and_timings(tiny):
    proc, out = tiny
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("tool", "env", "shape", "args", "decode", "evictions", "correctness", "wall_s"):
        assert key in r
    for key in ("torch", "cuda", "device", "device_name"):
        assert key in r["env"]
    assert r["shape"] == {**gk.TINY, "dtype": "float32", "block_size": 16, "window": 32, "sinks": 4}
    assert r["complete"] and not r["skipped"]
    assert [d["context"] for d in r["decode"]] == list(TINY_CONTEXTS)
    for d in r["decode"]:
        assert d["ms_per_step"] > 0 and d["ms_per_layer"] > 0 and d["forms_agree"]
    policies = list(gk.DEFAULT_POLICIES)
    want = [(c, b, p) for c in TINY_CONTEXTS for b in TINY_BUDGETS if b < c for p in policies]
    got = [(e["context"], e["budget"], e["policy"]) for e in r["evictions"]]
    assert got == want
    decode = {d["context"]: d["ms_per_step"] for d in r["decode"]}
    for e in r["evictions"]:
        assert e["ms_per_eviction"] > 0 and e["ms_per_layer"] > 0 and e["repeats"] >= 1
        assert e["ms_per_layer"] == pytest.approx(e["ms_per_eviction"] / gk.TINY["layers"], 1e-2)
        assert e["decode_ms_per_step"] == decode[e["context"]]
        assert e["ratio_to_decode"] == pytest.approx(
            e["ms_per_eviction"] / decode[e["context"]], 1e-2
        )
    assert r["target_result"]["applicable"] is False  # CPU, tiny shapes: correctness only


def test_tiny_batched_rows_timed_with_scratch(tiny):
    """Several rows evicting together through one compact_layer call, timed next to their
    decode attention, with the stated scratch bound (CPU: no measurement)."""
    proc, out = tiny
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    got = [(b["context"], b["policy"]) for b in r["batched"]]
    assert got == [(c, p) for c in TINY_CONTEXTS for p in gk.DEFAULT_POLICIES]
    for b in r["batched"]:
        assert b["rows"] == 4 and b["ms_per_layer"] > 0 and b["decode_ms_per_layer"] > 0
        assert b["ratio_to_decode"] == pytest.approx(b["ms_per_layer"] / b["decode_ms_per_layer"], 1e-2)  # fmt: skip
        assert b["scratch"]["bound_bytes"] > b["scratch"]["chunk_bound_bytes"] > 0
        assert "measured_bytes" not in b["scratch"]
    assert "| context | rows | policy |" in out.with_suffix(".md").read_text()


def test_tiny_fp32_cpu_matches_the_reference_exactly(tiny):
    """On CPU in float32 the paged eviction must keep exactly the reference's tokens."""
    proc, out = tiny
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    cor = r["correctness"]
    assert cor["passed"] and cor["checks"] == len(r["evictions"]) and not cor["failures"]
    assert cor["overlap_min"] == 1.0 and cor["indices_equal_all"]
    for e in r["evictions"]:
        c = e["check"]
        assert c["layers"] == [0, gk.TINY["layers"] - 1]
        assert c["overlap_min"] == 1.0 and c["indices_equal"], e
        assert c["moved_exact"] and c["equals_reference"] and c["untouched"], e
        assert c["refill_reproducible"] and c["passed"], e


def _argv(tmp_path, *extra):
    return ["--tiny", "--device", "cpu", "--contexts", "256", "--budgets", "64", "--repeats", "1",
            "--policies", "caote-snapkv", "--out", str(tmp_path / "r.json"), *extra]  # fmt: skip


def test_check_passes_unbroken(tmp_path):
    assert gk.main(_argv(tmp_path)) == 0


def _flipped_write(orig):
    def write(self, kv_cache, block_ids, keys, values):
        orig(self, kv_cache, block_ids, keys.flip(1), values.flip(1))  # kept tokens out of order

    return write


def _wrong_blocks_write(orig):
    def write(self, kv_cache, block_ids, keys, values):
        orig(self, kv_cache, block_ids.flip(0), keys, values)  # another request's blocks

    return write


# the engine's write through the step's token index (compaction.scatter_tokens), broken alike
def _flipped_scatter(orig):
    def scatter(plane, index, start, tokens, keep):
        orig(plane, index, start, tokens, keep.flip(-1))  # kept tokens out of order

    return scatter


def _wrong_blocks_scatter(orig):
    def scatter(plane, index, start, tokens, keep):
        bs = plane.shape[2]  # the request's blocks in reverse order
        blocks = index.block[::bs].flip(0).repeat_interleave(bs)[: index.block.numel()]
        orig(plane, compaction.TokenIndex(blocks, index.slot, index.heads), start, tokens, keep)

    return scatter


@pytest.mark.parametrize(
    "broken, flag",
    [
        ("write", "moved_exact"),
        ("blocks", "untouched"),
        ("scores", "overlap_min"),
    ],
)
def test_check_catches_a_broken_eviction(tmp_path, monkeypatch, broken, flag):
    if broken == "write":
        monkeypatch.setattr(
            compaction.PagedLayout, "write", _flipped_write(compaction.PagedLayout.write)
        )
        monkeypatch.setattr(
            compaction, "scatter_tokens", _flipped_scatter(compaction.scatter_tokens)
        )
    elif broken == "blocks":
        monkeypatch.setattr(
            compaction.PagedLayout, "write", _wrong_blocks_write(compaction.PagedLayout.write)
        )
        monkeypatch.setattr(
            compaction, "scatter_tokens", _wrong_blocks_scatter(compaction.scatter_tokens)
        )
    else:  # the device path scores different keys than the cache holds

        def dequantize(k, v, kv_cache_dtype, layer):
            return -k, v

        monkeypatch.setattr(gk.compaction, "dequantize", dequantize)
    assert gk.main(_argv(tmp_path)) == 1
    r = json.loads((tmp_path / "r.json").read_text())
    assert not r["correctness"]["passed"]
    c = r["evictions"][0]["check"]
    assert not c["passed"]
    assert (c[flag] < 0.99) if flag == "overlap_min" else (c[flag] is False)


@pytest.mark.parametrize("name", policy_names())
def test_every_policy_through_the_engines_compaction_matches_the_reference(name):
    """The engine's per-layer compaction, driven as the benchmark drives it, keeps exactly the
    reference's tokens in every layer, for every registered policy (H2O's running sum too)."""
    shape = gk.Shape(3, 2, 4, 16, "float32", 16, 32, 4)
    n, keep = 200, 96
    policy = get_policy(name)
    req = gk.PagedRequest(shape, n, torch.device("cpu"), seed=7)
    req.refill()
    layers = list(range(shape.layers))
    ref = gk.Reference(req, layers, EvictionSettings(window=shape.window, sinks=shape.sinks))
    assert ref.snapshot()
    before = {layer: req.raw[layer].clone() for layer in layers}
    evict = gk.EngineEviction(req, policy, keep, ref.settings)
    evict()
    check = gk.check_eviction(req, ref, policy, keep, before, min_overlap=1.0)
    assert check["passed"] and check["indices_equal"] and check["equals_reference"], check
    evict()  # again on the compacted cache, as the timed runs do: no state left behind breaks it
