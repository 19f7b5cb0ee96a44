"""Model features eviction cannot compact are refused by the engine itself at startup, naming
the feature (issue 14): built from tiny random-weight models in Hugging Face format (with the
embedded model's tokenizer), started through stock ``vllm.LLM`` with the plugin loaded."""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.engine


def _tiny_model(tmp_path, config) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_caote.models import model_dir

    src = model_dir()
    if not (src / "config.json").exists():
        pytest.skip("embedded model missing; run `python -m vllm_caote.models fetch`")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out = tmp_path / type(config).__name__
    model.save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    return str(out)


def _start_fails(model: str) -> str:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    from vllm_caote.eval.common import make_llm

    try:
        with pytest.raises(Exception) as e:  # noqa: PT011 - the message is what is checked
            make_llm(model, max_model_len=512, kv_space_gib="1", dtype="float32")
    finally:
        cleanup_dist_env_and_memory()  # the half-started engine's process-wide state
    chain, exc = [], e.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return " | ".join(chain)


def test_sliding_window_model_is_refused_naming_the_feature(tmp_path):
    from transformers import MistralConfig

    config = MistralConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=128,
        max_position_embeddings=1024,
    )  # fmt: skip
    msg = _start_fails(_tiny_model(tmp_path, config))
    assert "SlidingWindowSpec" in msg and "CAOTE_DISABLE=1" in msg, msg


def test_alibi_model_is_refused_naming_the_feature(tmp_path):
    from transformers import BloomConfig

    config = BloomConfig(vocab_size=49152, hidden_size=64, n_layer=2, n_head=4)
    msg = _start_fails(_tiny_model(tmp_path, config))
    assert "ALiBi" in msg and "CAOTE_DISABLE=1" in msg, msg
