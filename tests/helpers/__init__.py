"""Shared test helpers (not tests; importable as ``helpers`` because pytest puts ``tests/`` on
``sys.path``: ``pythonpath`` in pyproject.toml).

* :mod:`helpers.servers`: real OpenAI servers (the session's shared one, a test's own) and
  stock vLLM's greedy output;
* :mod:`helpers.kvpress_peer`: NVIDIA kvpress's presses, loaded without installing kvpress;
* ``stock_generate.py``: the script :func:`helpers.servers.stock_greedy` runs;
* :func:`embedded_engine_args`: the embedded model's ``EngineArgs`` (no engine started);
* :func:`missing`: how a test says that something it needs is not installed: in CI
  (``CI=true``, where ``make setup`` installs everything) a failure, elsewhere a skip that
  names what to install.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """True under CI (``CI=true``, as .ci/run's runner sets it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(what: str, install: str) -> NoReturn:
    """``what`` (a tool, package or file a test needs) is not there; ``install`` says how to
    get it. A failure in CI, which must run every test; a skip elsewhere."""
    message = f"{what} not installed ({install})"
    if in_ci():
        pytest.fail(f"{message}: CI runs every test; make setup must install it", pytrace=False)
    pytest.skip(message)


def embedded_engine_args(**kw):
    """``EngineArgs`` for the embedded model (eager, fp32, 2k context), ``kw`` on top: how
    tests build an engine config without starting an engine."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_caote.models import model_dir

    model = model_dir()
    if not (model / "config.json").exists():
        missing("the embedded model", "python -m vllm_caote.models fetch")
    base = dict(model=str(model), max_model_len=2048, enforce_eager=True, dtype="float32")
    base.update(kw)
    return EngineArgs(**base)


def engine_scheduler(llm):
    """The engine-core scheduler of an in-process ``vllm.LLM`` (as ``make_llm`` builds it)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def essay_ids(llm, n: int, offset: int) -> list[int]:
    """Exactly ``n`` token ids of essay text from ``offset``, in ``llm``'s tokenizer."""
    from benchmarks.tasks import filler_prompt_ids

    return filler_prompt_ids(llm.get_tokenizer(), n, offset)
