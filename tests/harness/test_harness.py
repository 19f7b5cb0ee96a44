"""The eval / bench / load-test harnesses' own logic (no engine): statistics, budget grids,
target checks and report rendering. The numbers they produce come from real runs
(`make eval`, `make bench`, `make loadtest`); these tests keep the bookkeeping honest."""

from __future__ import annotations

import json
import math

import pytest
from helpers import missing

from benchmarks.eval import FULL, budget_grid, render_md, summarize, targets
from benchmarks.eval.common import wilson


def test_wilson_interval_known_values():
    # Wilson 95% for 0/10, 5/10, 10/10 (textbook values)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    lo, hi = wilson(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-3) and hi == pytest.approx(1.0)
    assert wilson(0, 0) == (0.0, 1.0)


def test_budget_grid_clamps_to_engine_minimum_and_adds_full_cache():
    grid = budget_grid([1024, 4096], [0.125, 0.5], min_budget=164)
    assert grid[1024] == [
        ("0.125", 0.125, 164, True),  # 128 < 164
        ("0.5", 0.5, 512, False),
        (FULL, 1.0, None, False),
    ]
    assert grid[4096][0] == ("0.125", 0.125, 512, False)


def _pk(policy, label, correct, n=4):
    return [
        dict(
            task="passkey",
            policy=policy,
            budget_label=label,
            budget=None if label == FULL else 256,
            clamped=False,
            context=1024,
            correct=i < correct,
            kv_eviction=None if label == FULL else {"evicted_tokens": 700},
        )
        for i in range(n)
    ]


def _ppl(policy, label, nll):
    return [
        dict(
            task="ppl",
            policy=policy,
            budget_label=label,
            budget=None if label == FULL else 256,
            clamped=False,
            context=1024,
            nll_sum=nll * 1023,
            nll_n=1023,
            nll_tail_sum=nll * 512,
            nll_tail_n=512,
            kv_eviction=None,
        )
    ]


def _result(s: dict, policies: list[str]) -> dict:
    """An eval result around summary ``s``, as ``benchmarks.eval.main`` builds it."""
    return dict(
        config=dict(
            model="/m/SmolLM2",
            command="python -m benchmarks.eval --quick",
            contexts=[1024],
            depths=[0.5],
            samples=4,
            ppl_passages=1,
            budget_tokens={"1024": {"0.25": 256}},
            budget_labels=["0.25", FULL],
            min_budget=68,
            clamped=[],
            policies=policies,
            prefill_chunk=512,
            block_size=32,
        ),
        summary=s,
        targets=targets(s, ["0.25", FULL]),
        wall_s=1.0,
        notes=[],
    )


def test_results_json_is_written_when_matplotlib_is_missing(tmp_path, monkeypatch):
    """On a box installed without the `bench` extra the numbers survive the plotting step."""
    import sys

    from benchmarks.eval.common import write_results
    from benchmarks.eval.report import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises
    rows = _pk(FULL, FULL, 4) + _pk("caote-snapkv", "0.25", 4) + _pk("snapkv", "0.25", 3)
    result = _result(summarize(rows), ["caote-snapkv", "snapkv"])
    md = write_results(tmp_path, "eval", result, render_md, plot)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["summary"]["passkey"]["snapkv"]["0.25"]["correct"] == 3
    assert saved["plots"] == [] and "no plots" in saved["notes"][-1]
    assert (tmp_path / "eval.md").read_text() == md and "| snapkv | 75% [" in md


def test_summary_targets_and_report():
    rows = (
        _pk(FULL, FULL, 4)
        + _pk("caote-snapkv", "0.25", 4)
        + _pk("snapkv", "0.25", 3)
        + _pk("caote-h2o", "0.25", 1)
        + _pk("h2o", "0.25", 2)
        + _ppl(FULL, FULL, 2.0)
        + _ppl("caote-snapkv", "0.25", 2.1)
        + _ppl("snapkv", "0.25", 2.2)
    )
    s = summarize(rows)
    cell = s["passkey"]["snapkv"]["0.25"]
    assert (cell["correct"], cell["n"], cell["accuracy"]) == (3, 4, 0.75)
    assert cell["ci95"][0] < 0.75 < cell["ci95"][1]
    assert cell["mean_evicted_tokens"] == 700
    assert s["ppl"]["snapkv"]["0.25"]["ppl"] == pytest.approx(math.exp(2.2))

    t = targets(s, ["0.25", FULL])
    best = t["passkey_25pct_best_caote"]
    assert best["policy"] == "caote-snapkv" and best["gap_points"] == 0 and best["met"]
    by_pair = {(r["caote"], r["base"]): r for r in t["caote_vs_base"]}
    assert by_pair[("caote-snapkv", "snapkv")]["passkey_met"] is True
    assert by_pair[("caote-snapkv", "snapkv")]["ppl_met"] is True
    assert by_pair[("caote-h2o", "h2o")]["passkey_met"] is False  # 25% < 50%: reported, not hidden

    result = _result(s, ["caote-snapkv", "snapkv", "caote-h2o", "h2o"])
    md = render_md(result)
    assert "| caote-snapkv | 100% [" in md
    assert "| snapkv | 75% [" in md
    assert "caote-h2o vs h2o @ 0.25: passkey 25% vs 50% (<)" in md
    assert "**met**" in md


def test_loadtest_helpers():
    from loadtest import _parse_budgets, check_loopback, pct

    assert _parse_budgets("none,512,0") == [None, 512, None]
    assert pct([1, 2, 3, 4], 50) == 2.5 and pct([], 50) is None
    assert pct([5.0], 99) == 5.0
    assert check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_loopback("http://localhost:1") == "http://localhost:1"
    with pytest.raises(SystemExit, match="loopback"):
        check_loopback("http://10.0.0.1:8000")


def test_bench_decode_variants_bracket_the_sequence():
    from benchmarks.engine import decode_variants

    class A:
        decode_prompt, decode_tokens = 300, 136

    v = decode_variants(A, min_budget=164, bs=128)
    assert v["stock"] is None
    assert v["no_evict"] >= 300 + 136  # covers the whole sequence: nothing is evicted
    assert v["evicting"] == 164 < 300  # forces evictions


def test_longbench_scoring_and_loading(tmp_path):
    from benchmarks.eval import longbench

    assert longbench.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert longbench.token_f1("the brown fox", "quick brown fox") == pytest.approx(0.8)
    assert longbench.qa_f1("Paris\nbecause ...", ["paris", "Lyon"]) == 1.0
    assert longbench.qa_f1("", ["x"]) == 0.0

    recs = [
        {"_id": f"r{i}", "context": "c " * 50, "input": "q?", "answers": ["a"]} for i in range(5)
    ]
    (tmp_path / "qasper.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    got = longbench.load("qasper", str(tmp_path), limit=3, cache=tmp_path)
    assert [r["id"] for r in got] == ["r0", "r1", "r2"] and got[0]["answers"] == ["a"]
    with pytest.raises(FileNotFoundError, match="hotpotqa.jsonl"):
        longbench.load("hotpotqa", str(tmp_path), limit=3, cache=tmp_path)

    class Tok:  # one token per character, no chat template: enough for the truncation rule
        chat_template = None

        def encode(self, s, add_special_tokens=False):
            return list(s)

        def decode(self, ids):
            return "".join(ids)

    prompt, n = longbench.build_prompt(Tok(), {"context": "AB" + "x" * 96 + "YZ", "input": "q"}, 10)
    assert n == 10 and "ABxxx" in prompt and "xxxYZ" in prompt and "x" * 11 not in prompt


def test_longbench_summary():
    rows = [
        dict(
            task="longbench",
            dataset=ds,
            policy=pol,
            budget_label=lb,
            budget=None if lb == FULL else 300,
            clamped=False,
            f1=f1,
            kv_eviction=None,
        )
        for pol, lb, ds, f1 in [
            (FULL, FULL, "qasper", 0.5),
            (FULL, FULL, "hotpotqa", 0.7),
            ("caote-snapkv", "0.25", "qasper", 0.4),
            ("caote-snapkv", "0.25", "hotpotqa", 0.6),
            ("snapkv", "0.25", "qasper", 0.3),
            ("snapkv", "0.25", "hotpotqa", 0.5),
        ]
    ]
    s = summarize(rows)
    assert s["longbench"][FULL][FULL]["f1"] == pytest.approx(0.6)
    assert s["longbench"]["snapkv"]["0.25"]["f1_by_dataset"] == {"qasper": 0.3, "hotpotqa": 0.5}
    pair = {r["caote"]: r for r in targets(s, ["0.25", FULL])["caote_vs_base"]}["caote-snapkv"]
    assert pair["longbench_f1"] == [pytest.approx(0.5), pytest.approx(0.4)]
    assert pair["longbench_met"]


def test_multikey_case_hides_every_key_and_asks_for_one():
    from vllm_caote.models import model_dir

    if not (model_dir() / "config.json").exists():
        missing("embedded model", "make setup-serve, or python -m vllm_caote.models fetch")
    from transformers import AutoTokenizer

    from benchmarks.tasks import MULTIKEY_NEEDLE, multikey_case

    tok = AutoTokenizer.from_pretrained(model_dir())
    case = multikey_case(tok, 1024, n_keys=4, seed=3)
    needles = case.prompt.count(MULTIKEY_NEEDLE.split("{name}")[0])
    assert needles == 4 and case.prompt.count(case.passkey) == 1
    asked = case.prompt.rsplit("magic number for ", 1)[1].split("?")[0]
    assert MULTIKEY_NEEDLE.format(name=asked, key=case.passkey) in case.prompt
    assert 1024 <= len(tok.encode(case.prompt)) <= 1024 + 150
    assert multikey_case(tok, 1024, seed=3) == case  # deterministic


def test_lookalike_case_states_every_pair_once_and_asks_for_one():
    from vllm_caote.models import model_dir

    if not (model_dir() / "config.json").exists():
        missing("embedded model", "make setup-serve, or python -m vllm_caote.models fetch")
    from transformers import AutoTokenizer

    from benchmarks.tasks import LOOKALIKE_NEEDLE, lookalike_case

    tok = AutoTokenizer.from_pretrained(model_dir())
    for values in ("digits", "words"):
        case = lookalike_case(tok, 512, n_pairs=12, values=values, seed=5)
        assert case.prompt.count(" The value for ") == 12
        assert case.prompt.count(LOOKALIKE_NEEDLE.format(key=case.key, value=case.answer)) == 1
        assert case.prompt.count(f"for {case.key} is ") == 1  # every key is distinct
        asked = case.prompt.rsplit("value for ", 1)[1].split("?")[0]
        assert asked == case.key
        if values == "digits":
            assert case.answer.isdigit() and 5 <= len(case.answer) <= 9
        else:
            assert len(case.answer.split()) == 3
        assert lookalike_case(tok, 512, n_pairs=12, values=values, seed=5) == case


def test_the_plugin_loads_without_the_harness():
    """What vLLM loads (the plugin entry points, the engine, API and metrics modules) must not
    import the benchmark/eval harness (top-level benchmarks/ and loadtest/, not in the wheel)."""
    import subprocess
    import sys

    code = (
        "import sys, vllm_caote.plugin as p; p.register();"
        "import vllm_caote.engine.model_runner, vllm_caote.engine.scheduler, vllm_caote.engine.worker;"
        "import vllm_caote.api.server, vllm_caote.metrics.logger;"
        "bad = sorted(m for m in sys.modules if m.startswith(('benchmarks', 'loadtest')));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert r.stdout.strip().endswith("[]")


def test_decode_heavy_budgets_follow_the_plugins_rounding():
    from loadtest.decode_summary import (
        budget_for,
        label_of,
        parse_compressions,
        pool_holds,
        ppl_fractions,
    )

    # 1024 + 512 tokens, 128-token blocks, minimum 164 (4 sinks + 32 window + one block)
    b8 = budget_for(1024, 512, 8, block_size=128, min_budget=164)
    assert (b8["budget"], b8["keep"], b8["cap_blocks"], b8["clamped"]) == (192, 256, 3, False)
    # 32-token blocks: the default 128-token slack is four blocks past keep (192 tokens)
    assert budget_for(1024, 512, 8, block_size=32, min_budget=68)["cap_blocks"] == 6 + 4
    assert b8["kept_compression"] == 1536 / 256
    b4 = budget_for(1024, 512, 4, block_size=128, min_budget=164)
    assert (b4["budget"], b4["keep"], b4["cap_blocks"]) == (384, 384, 4)
    # ceil, then the engine minimum: 1152 / 8 = 144 < 164
    b = budget_for(1024, 128, 8, block_size=128, min_budget=164)
    assert (b["budget"], b["keep"], b["clamped"]) == (164, 256, True)
    assert budget_for(1000, 1, 3, block_size=32, min_budget=68)["budget"] == 334  # ceil(1001/3)
    # a 40-block pool: 3 stock requests at 12 blocks, 13 at the 8x cap, 10 at the 4x cap
    assert [pool_holds(40, n) for n in (12, 3, 4)] == [3, 13, 10]
    assert parse_compressions("4, 8") == [4.0, 8.0] and label_of(8.0) == "8x"
    assert label_of(None) == "stock" and label_of(2.5) == "2.5x"
    with pytest.raises(ValueError):
        parse_compressions("1,4")
    # the eval's budget grid turns the fractions back into exactly these budgets
    infos = [b4, b8, b]
    fr = ppl_fractions(infos)
    assert [round(f * i["sequence_tokens"]) for f, i in zip(fr, infos, strict=True)] == [
        384,
        192,
        164,
    ]
    grid = budget_grid([1536], fr[:2], min_budget=164)[1536]
    assert [t for _, _, t, _ in grid] == [384, 192, None]


def _poll(t, running, waiting, steps, gen, ev=0.0, events=0, prompt=0):
    return dict(t=t, running=running, waiting=waiting, steps=steps, generation_tokens=gen,
                eviction_s=ev, evictions=events, prompt_tokens=prompt, preemptions=0,
                prefix_cache_hits=0, evicted_tokens=0)  # fmt: skip


def test_decode_heavy_steady_state_keeps_only_pure_decode_intervals():
    from loadtest.decode_summary import decode_steady_state, is_decode_interval

    s = [
        _poll(0.0, 4, 6, 10, 100),
        _poll(1.0, 4, 6, 20, 140, ev=0.02, events=1),  # 10 steps x 4 tokens: decode
        _poll(2.0, 4, 6, 30, 175, ev=0.50, events=2),  # 35 < 40: someone was in prefill
        _poll(3.0, 4, 6, 35, 195, ev=0.52, events=3, prompt=1024),  # a prompt finished
        _poll(4.0, 4, 6, 45, 235, ev=0.56, events=4, prompt=1024),  # decode
        _poll(5.0, 3, 6, 55, 265, ev=0.56, events=4, prompt=1024),  # one finished
        _poll(6.0, 3, 0, 65, 295, ev=0.60, events=5, prompt=1024),  # decode, but nobody waited
        _poll(7.0, 3, 0, 75, 325, ev=0.64, events=6, prompt=1024),  # (waiting at the start: 0)
    ]
    kept = [i for i in range(len(s) - 1) if is_decode_interval(s[i], s[i + 1])]
    assert kept == [0, 3, 5]
    d = decode_steady_state(s)
    assert d["intervals"] == 3 and d["seconds"] == pytest.approx(3.0)
    assert d["steps"] == 30 and d["step_ms"] == pytest.approx(100.0)
    assert d["output_tokens_per_s"] == pytest.approx((40 + 40 + 30) / 3)
    assert d["mean_running"] == pytest.approx((4 + 4 + 3) / 3)
    # eviction share: (0.02 + 0.04 + 0.04) s of eviction in 3 s of decode steps
    assert d["eviction_share"] == pytest.approx(0.10 / 3)
    assert d["eviction_ms_per_step"] == pytest.approx(100 * 0.10 / 30 * 10)
    assert decode_steady_state(s[:1]) == dict(seconds=0.0, intervals=0)


def test_decode_heavy_summary_ratios_and_targets():
    from loadtest.decode_report import render_md
    from loadtest.decode_summary import (
        add_ratios,
        check_targets,
        middle_half,
        summarize_config,
    )

    class Out:
        def __init__(self, ttft, latency, n, ok=True):
            self.success, self.ttft, self.latency, self.output_tokens = ok, ttft, latency, n
            self.prompt_len, self.error = 1024, "" if ok else "boom"

    def cfg(label, running, tpot, evict, budget=None):
        samples = [_poll(t, running, 5, 10 * t, 10 * t * running, ev=evict * t) for t in range(11)]
        before, after = samples[0], samples[-1]
        info = None if budget is None else dict(compression=float(label[:-1]), budget=budget,
                                                 keep=256, sequence_tokens=1536)  # fmt: skip
        outs = [Out(1.0, 1.0 + tpot * 511, 512) for _ in range(running)] + [Out(0, 0, 0, False)]
        return summarize_config(label, info, outs, 10.0, samples, before, after)

    stock, b8 = cfg("stock", 3, 0.1, 0.0), cfg("8x", 12, 0.2, 0.03, budget=192)
    assert stock["output_tokens_per_s"] == pytest.approx(3 * 512 / 10)
    assert stock["ok"] == 3 and stock["errors"] == 1 and stock["error_samples"] == ["boom"]
    assert stock["tpot_p50_ms"] == pytest.approx(100.0)
    assert b8["eviction_share"] == pytest.approx(0.03) and b8["evictions"] == 0
    mid = middle_half(b8["samples"], 10.0)  # the polls in [2.5, 7.5]: t = 3 .. 7
    assert mid["seconds"] == pytest.approx(4.0) and mid["samples"] == 5
    assert mid["eviction_share"] == pytest.approx(0.03) and mid["step_ms"] == pytest.approx(100)
    configs = [stock, b8]
    add_ratios(configs)
    assert b8["output_tokens_per_s_ratio"] == pytest.approx(4.0)
    assert b8["peak_running_ratio"] == pytest.approx(4.0)
    assert b8["tpot_p50_ms_ratio"] == pytest.approx(2.0)
    assert b8["decode"]["output_tokens_per_s_ratio"] == pytest.approx(4.0)
    rows = {r["metric"]: r for r in check_targets(configs) if r["config"] == "8x"}
    assert rows["output_tokens_per_s_ratio"]["met"] and rows["mean_running_ratio"]["met"]
    assert rows["eviction_share_decode"]["value"] == pytest.approx(0.03)
    assert rows["eviction_share_decode"]["met"]
    missing_4x = [r for r in check_targets(configs) if r["config"] == "4x"]
    assert missing_4x and not any(r["met"] for r in missing_4x)  # no 4x run: not met
    tight = check_targets(configs, {"8x": dict(eviction_share_decode=0.01)})
    assert not tight[0]["met"]
    md = render_md(
        dict(requests=4, prompt_tokens=1024, output_tokens=512, sequence_tokens=1536,
             pool_blocks=40, block_size=128, policy="caote-snapkv", pool_holds={"stock": 3},
             configs=configs, targets=check_targets(configs), command="x", wall_s=20.0)
    )  # fmt: skip
    assert "| 8x | 192 (256) | 614.4 | 4.00x |" in md
    assert "output tokens/s vs stock 4.00x (target >= 3x): **met**" in md
    assert "4x: output tokens/s vs stock - (target >= 2x): **missed**" in md


def test_command_line_leads_with_the_caote_settings_in_force(monkeypatch):
    from benchmarks.provenance import command_line

    monkeypatch.setenv("CAOTE_PREFILL_BASE", "keydiff")
    monkeypatch.setenv("CAOTE_PREFILL", "blockwise")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # not a plugin setting: left out
    cmd = command_line("benchmarks.eval", ["--tasks", "ppl"])
    assert cmd == (
        "CAOTE_PREFILL=blockwise CAOTE_PREFILL_BASE=keydiff python -m benchmarks.eval --tasks ppl"
    )


def test_needle_trace_report_counts_strong_layers_and_splits():
    from benchmarks.needle_trace import render_md

    row = dict(phrasing="end", haystack="kjv", depth=0.75, key_at=1155, correct=True,
               text="The secret passkey is 36109.", heads_with_key=0.5,
               heads_with_key_per_layer=[0.0, 0.67, 1.0, 0.33],
               kept_share_by_chunk=[0.25, 0.35, 0.4])  # fmt: skip
    mode = dict(mode="blockwise:keydiff", correct=1, n=1, budget=375, block_size=128,
                prefill_chunk=512, rows=[row])  # fmt: skip
    md = render_md(dict(policy="caote-snapkv", fraction=0.25, command="x", modes=[mode]))
    assert "## `blockwise:keydiff`: 1/1 correct" in md
    assert "| end | kjv | 0.75 | 1155 | yes | 50% | 2 | 25% / 35% / 40% |" in md, md
    assert "50% where the answer is right, n/a (none) where it is wrong" in md
