"""The benchmark and evaluation harness of vllm-caote: not part of the plugin or its wheel.

A top-level package of the repository, run from its root (``python -m benchmarks...``); the
load tests against a real server are its sibling :mod:`loadtest`. The plugin never imports
either (``tests/harness/test_harness.py`` checks). Their extra dependencies: ``pip install -e
'.[bench]'`` (``make setup`` installs them). One prompt and task library
(:mod:`benchmarks.tasks`) feeds all of:

    python -m benchmarks                    # engine benchmark (make bench)
    python -m benchmarks.eval               # quality vs budget (make eval)
    python -m loadtest                      # the real OpenAI server under load (make loadtest)
    python -m loadtest.quality              # accuracy at capacity (make bench-quality)
    python -m benchmarks.gpu_kernels        # scoring + compaction on CUDA, torch only

Results (JSON + Markdown + PNG) go under ``benchmarks/results/``.
"""
