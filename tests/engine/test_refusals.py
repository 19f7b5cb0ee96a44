"""Model features eviction cannot compact are refused by the engine itself at startup, naming
the feature (issues 14, 18): built from tiny random-weight models in Hugging Face format (with the
embedded model's tokenizer), started through stock ``vllm.LLM`` with the plugin loaded. Each test
asserts the plugin's own message (the feature named, ``CAOTE_DISABLE=1`` as the way out): a start
that succeeds, or fails for another reason, fails the test.

Two checks cannot be triggered by a model or a flag on vLLM-CPU, whose platform picks
``CPU_ATTN`` for every non-MLA layer whatever ``--attention-backend`` says, and whose
``CPU_ATTN`` takes every block size it accepts (multiples of 32) as its kernel block size. They
are started through ``vllm.LLM`` all the same, with one documented seam each: vLLM's own backend
registry pointing ``CPU_ATTN`` at the stock, unwrapped backend (what another plugin overriding
it would do), and the stock backend declaring 32-token kernel blocks (as GPU backends do).
"""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.engine


def _tiny_model(tmp_path, config, name: str | None = None) -> str:
    import torch
    from helpers import missing
    from transformers import AutoModelForCausalLM

    from vllm_caote.models import model_dir

    src = model_dir()
    if not (src / "config.json").exists():
        missing("the embedded model", "python -m vllm_caote.models fetch")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out = tmp_path / (name or type(config).__name__)
    model.save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    return str(out)


def _start_fails(model: str, **kwargs) -> str:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    from benchmarks.eval.common import make_llm

    try:
        with pytest.raises(Exception) as e:  # noqa: PT011 - the message is what is checked
            make_llm(model, max_model_len=512, kv_space_gib="1", dtype="float32", **kwargs)
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


def _llama(tmp_path) -> str:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
    )  # fmt: skip
    return _tiny_model(tmp_path, config)


@pytest.mark.parametrize("hybrid_off", [False, True], ids=["hybrid-manager", "no-hybrid"])
def test_mixed_sliding_window_model_is_refused_naming_the_feature(tmp_path, hybrid_off):
    """Gemma 3: one sliding-window layer, one full. With vLLM's hybrid KV-cache manager (its
    default) that is two KV-cache groups; with --disable-hybrid-kv-cache-manager one
    full-attention group whose spec carries the window (the layer still attends over it)."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1024,
    )  # fmt: skip
    model = _tiny_model(tmp_path, config)
    msg = _start_fails(model, disable_hybrid_kv_cache_manager=hybrid_off)
    if hybrid_off:
        assert "sliding-window attention (window 64 tokens)" in msg, msg
        assert "--disable-hybrid-kv-cache-manager" in msg, msg
    else:
        assert "2 KV-cache groups (FullAttentionSpec, SlidingWindowSpec" in msg, msg
    assert "CAOTE_DISABLE=1" in msg, msg


@pytest.mark.parametrize("hybrid_off", [False, True], ids=["hybrid-manager", "no-hybrid"])
def test_chunked_local_attention_model_is_refused_naming_the_feature(tmp_path, hybrid_off):
    """Llama 4 (text only, no MoE layer): one chunked-local layer (RoPE), one full (NoPE)."""
    from transformers import Llama4TextConfig

    config = Llama4TextConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_local_experts=2, num_experts_per_tok=1, no_rope_layers=[1, 0],
        attention_chunk_size=64, use_qk_norm=False, max_position_embeddings=1024,
        moe_layers=[], interleave_moe_layer_step=0,  # no MoE: for transformers and for vLLM
    )  # fmt: skip
    model = _tiny_model(tmp_path, config)
    msg = _start_fails(model, disable_hybrid_kv_cache_manager=hybrid_off)
    if hybrid_off:
        assert "chunked-local attention (chunk 64 tokens)" in msg, msg
    else:
        assert "2 KV-cache groups (ChunkedLocalAttentionSpec, FullAttentionSpec" in msg, msg
    assert "CAOTE_DISABLE=1" in msg, msg


def test_kv_sharing_model_is_refused_naming_the_feature(tmp_path):
    """Gemma 3n: the last layer reads the first layer's KV cache (vLLM adds such layers to its
    runner's own copy of the KV-cache config only)."""
    from transformers import Gemma3nTextConfig

    config = Gemma3nTextConfig(
        vocab_size=49152, vocab_size_per_layer_input=49152, hidden_size=64,
        hidden_size_per_layer_input=16, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=64,
        layer_types=["full_attention", "full_attention"], num_kv_shared_layers=1,
        altup_num_inputs=2, laurel_rank=8, activation_sparsity_pattern=[0.0, 0.0],
        max_position_embeddings=1024,
    )  # fmt: skip
    msg = _start_fails(_tiny_model(tmp_path, config))
    assert "model.layers.1.self_attn.attn reads layer model.layers.0.self_attn.attn" in msg, msg
    assert "(KV sharing" in msg and "CAOTE_DISABLE=1" in msg, msg


def test_mla_model_is_refused_when_vllm_builds_its_config(tmp_path):
    """DeepSeek-V2 (MLA, no MoE layer): refused while ``EngineArgs.create_engine_config`` runs,
    before any engine is built."""
    from transformers import DeepseekV2Config
    from vllm.engine.arg_utils import EngineArgs

    from vllm_caote.configure import ConfigConflictError

    config = DeepseekV2Config(
        vocab_size=49152, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
        q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
        n_routed_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1,
        first_k_dense_replace=2, max_position_embeddings=1024,
    )  # fmt: skip
    args = EngineArgs(
        model=_tiny_model(tmp_path, config), max_model_len=512, enforce_eager=True,
        dtype="float32",
    )  # fmt: skip
    with pytest.raises(ConfigConflictError) as e:
        args.create_engine_config()
    msg = str(e.value)
    assert "Multi-head latent attention (MLA" in msg and "CAOTE_DISABLE=1" in msg, msg


@pytest.fixture
def stock_cpu_attention(monkeypatch):
    """vLLM's backend registry points ``CPU_ATTN`` at the stock, unwrapped backend (as another
    plugin overriding it after this one would): the only way to get a layer the plugin does not
    wrap on vLLM-CPU, which ignores ``--attention-backend`` for every other backend."""
    from vllm.plugins import load_general_plugins
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends.registry import (
        _ATTN_OVERRIDES,
        AttentionBackendEnum,
        register_backend,
    )

    load_general_plugins()  # the plugin has registered its wrapper: override it after
    key = AttentionBackendEnum.CPU_ATTN
    assert _ATTN_OVERRIDES.get(key, "").startswith("vllm_caote."), _ATTN_OVERRIDES
    monkeypatch.setitem(_ATTN_OVERRIDES, key, _ATTN_OVERRIDES[key])  # restored afterwards
    register_backend(key, "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend")
    selector._cached_get_attn_backend.cache_clear()
    yield
    selector._cached_get_attn_backend.cache_clear()


def test_unwrapped_attention_backend_is_refused_naming_layer_and_backend(
    tmp_path, stock_cpu_attention
):
    msg = _start_fails(_llama(tmp_path))
    assert (
        "layer model.layers.0.self_attn.attn runs attention backend CPUAttentionBackendImpl, "
        "which the plugin does not wrap"
    ) in msg, msg
    assert "--attention-backend" in msg and "CAOTE_DISABLE=1" in msg, msg


def test_kernel_blocks_split_from_manager_blocks_are_refused(tmp_path, monkeypatch):
    """A backend whose kernels take only 32-token blocks, under vLLM-CPU's default 128-token
    manager blocks: vLLM splits each block into four kernel blocks (``AttentionGroup``'s
    ``kernel_block_size``), which compaction cannot address; ``--block-size 32`` (the way out
    the message gives) starts."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from benchmarks.eval.common import close_llm, make_llm

    monkeypatch.setattr(
        CPUAttentionBackend,
        "get_supported_kernel_block_sizes",
        staticmethod(lambda kv_cache_spec=None: [32]),
    )
    model = _llama(tmp_path)
    msg = _start_fails(model)
    assert "32-token kernel blocks (attention backend CPU_ATTN)" in msg, msg
    assert "manager's 128-token blocks" in msg and "--block-size 32" in msg, msg
    assert "CAOTE_DISABLE=1" in msg, msg

    llm = make_llm(model, max_model_len=512, kv_space_gib="1", dtype="float32", block_size=32)
    close_llm(llm)


def test_non_causal_prefix_lm_layers_are_refused(tmp_path, monkeypatch):
    """Prefix-LM attention (vLLM's ``PrefillPrefixLMAttention``, HRM-Text) tags its layers'
    spec ``non_causal=True``; HRM-Text's checkpoint format cannot be built here, so the seam
    does to a tiny Llama's layers exactly what that class does (``get_kv_cache_spec`` flips the
    flag on the stock spec) and the engine starts through ``vllm.LLM``."""
    from dataclasses import replace

    from vllm.model_executor.layers.attention import Attention

    stock = Attention.get_kv_cache_spec
    monkeypatch.setattr(
        Attention,
        "get_kv_cache_spec",
        lambda self, vllm_config: replace(stock(self, vllm_config), non_causal=True),
    )
    msg = _start_fails(_llama(tmp_path))
    assert "non-causal (prefix-LM) attention" in msg and "CAOTE_DISABLE=1" in msg, msg


def _config_folder(tmp_path, config, name: str, *processors) -> str:
    """A Hugging Face model folder without weights (``EngineArgs.create_engine_config`` reads
    none): ``config``, the embedded model's tokenizer and any ``processors``."""
    from helpers import missing

    from vllm_caote.models import model_dir

    src = model_dir()
    if not (src / "config.json").exists():
        missing("the embedded model", "python -m vllm_caote.models fetch")
    out = tmp_path / name
    config.save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    for p in processors:
        p.save_pretrained(out)
    return str(out)


def _engine_config(model: str, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=model, max_model_len=512, enforce_eager=True, dtype="float32", **kwargs)
    return args.create_engine_config()


def test_fp8_kv_cache_with_per_head_scales_is_refused(tmp_path):
    """A compressed-tensors checkpoint whose KV-cache scales are per head (strategy
    ``attn_head``): vLLM keeps one scale per layer (the heads' maximum), so scoring would
    dequantise every other head on the wrong scale. Refused with an fp8 cache; per-tensor scales,
    or the cache left unquantised, start."""
    from transformers import LlamaConfig

    from vllm_caote.configure import ConfigConflictError

    def checkpoint(strategy: str) -> str:
        config = LlamaConfig(
            vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=1024,
        )  # fmt: skip
        config.quantization_config = {
            "quant_method": "compressed-tensors", "format": "dense", "config_groups": {},
            "ignore": [], "kv_cache_scheme": {
                "num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True,
                "dynamic": False,
            },
        }  # fmt: skip
        return _config_folder(tmp_path, config, strategy)

    per_head = checkpoint("attn_head")
    with pytest.raises(ConfigConflictError) as e:
        _engine_config(per_head, kv_cache_dtype="fp8")
    msg = str(e.value)
    assert "per-head KV-cache scales" in msg and "attn_head" in msg, msg
    assert "--kv-cache-dtype fp8" in msg and "CAOTE_DISABLE=1" in msg, msg
    assert _engine_config(per_head).cache_config.cache_dtype == "auto"
    assert _engine_config(checkpoint("tensor"), kv_cache_dtype="fp8").cache_config.cache_dtype


def test_multimodal_model_is_refused_unless_prompts_are_read_whole(tmp_path):
    """PaliGemma (tiny, no weights): a block-wise prefill chunk is cut after vLLM scheduled the
    chunk's encoder inputs, so it could split an image. Refused while a budgeted prompt may be
    read block-wise (``prefill`` adaptive or blockwise); ``prefill: oneshot`` starts."""
    from transformers import GemmaConfig, PaliGemmaConfig, SiglipImageProcessor, SiglipVisionConfig

    from vllm_caote.configure import ConfigConflictError

    config = PaliGemmaConfig(
        text_config=GemmaConfig(
            vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        ),
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=16,
        ),
        projection_dim=64, image_token_index=49151,
    )  # fmt: skip
    model = _config_folder(
        tmp_path, config, "paligemma", SiglipImageProcessor(size={"height": 32, "width": 32})
    )
    for prefill in ("adaptive", "blockwise"):
        with pytest.raises(ConfigConflictError) as e:
            _engine_config(model, additional_config={"kv_eviction": {"prefill": prefill}})
        msg = str(e.value)
        assert "multimodal model" in msg and f"prefill '{prefill}'" in msg, msg
        assert '"prefill": "oneshot"' in msg and "CAOTE_DISABLE=1" in msg, msg
    ok = _engine_config(model, additional_config={"kv_eviction": {"prefill": "oneshot"}})
    assert ok.model_config.is_multimodal_model
