"""The benchmark and evaluation harness of vllm-caote: not part of the plugin.

What ``vllm serve`` loads is :mod:`vllm_caote` without this subpackage (the plugin never imports
it; ``tests/test_harness.py`` checks). Install its extra dependencies with ``pip install
'vllm-caote[bench]'``. One prompt and task library (:mod:`vllm_caote.bench.tasks`) feeds all of:

    python -m vllm_caote.bench                    # engine benchmark (make bench)
    python -m vllm_caote.bench.eval               # quality vs budget (make eval)
    python -m vllm_caote.bench.loadtest           # the real OpenAI server under load (make loadtest)
    python -m vllm_caote.bench.loadtest.quality   # accuracy at capacity (make bench-quality)
    python -m vllm_caote.bench.gpu_kernels        # scoring + compaction on CUDA, torch only

Results (JSON + Markdown + PNG) go under ``bench/results/``.
"""
