"""NVIDIA kvpress as a test-only accuracy peer: its presses on the same model and prompts.

kvpress compresses a prompt inside the Hugging Face forward pass: a hook on every attention
layer hands that layer's cache (and hidden states) to ``press.compress`` right after the
prefill, and generation continues on the compressed cache with true positions. Prefill hidden
states never depend on the compression, so one prefill per prompt can serve every press: the
hook here calls each press's own ``compress`` on the same layer inputs and keeps one compressed
cache per press. Scores, ``n_kept`` and the top-k selection are kvpress's own code.

kvpress is not a dependency (its pins clash with this project's); ``load_kvpress`` finds an
unpacked copy through ``CAOTE_KVPRESS_SRC`` (``make setup`` unpacks kvpress 0.5.5) or an
installed one, and only its press modules are imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch

#: our policy name -> (kvpress module, press class)
PRESSES = {
    "snapkv": ("snapkv_press", "SnapKVPress"),
    "tova": ("tova_press", "TOVAPress"),
    "keydiff": ("keydiff_press", "KeyDiffPress"),
    "streaming": ("streaming_llm_press", "StreamingLLMPress"),
    "expected-attention": ("expected_attention_press", "ExpectedAttentionPress"),
}


#: how to get kvpress, for the tests' skip/fail message
INSTALL_HINT = (
    "make setup unpacks kvpress 0.5.5 into .venv/kvpress-src; make test passes it as "
    "CAOTE_KVPRESS_SRC (run pytest directly with CAOTE_KVPRESS_SRC=.venv/kvpress-src)"
)


def kvpress_root() -> Path | None:
    src = os.environ.get("CAOTE_KVPRESS_SRC")
    if src:
        root = Path(src) / "kvpress"
    else:
        spec = importlib.util.find_spec("kvpress")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = Path(next(iter(spec.submodule_search_locations)))
    return root if (root / "presses" / "scorer_press.py").is_file() else None


def press_module(root: Path, module: str):
    """``kvpress.presses.<module>``, imported without kvpress's own ``__init__`` (which pulls
    in ``datasets`` and the pipeline)."""
    if "kvpress" not in sys.modules:
        stub = types.ModuleType("kvpress")
        stub.__path__ = [str(root)]  # the package path without running kvpress/__init__.py
        sys.modules["kvpress"] = stub
    return importlib.import_module(f"kvpress.presses.{module}")


def load_kvpress(root: Path) -> dict[str, type]:
    """{policy name: kvpress press class}."""
    return {name: getattr(press_module(root, mod), cls) for name, (mod, cls) in PRESSES.items()}


class KVPressPeer:
    """The Hugging Face model with kvpress presses applied to whole prompts."""

    def __init__(self, model_dir: str, press_classes: dict[str, type]):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
        # kvpress's pipeline gives every attention layer the model's rotary embedding (presses
        # that rotate queries, as ExpectedAttentionPress, read it there); so does this peer
        for layer in self.model.model.layers:
            layer.self_attn.rotary_emb = self.model.model.rotary_emb
        self.press_classes = press_classes

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[int],
        compression_ratio: float,
        max_tokens: int = 12,
        extra_presses: dict[str, object] | None = None,
    ) -> dict[str, str]:
        """Greedy answers for the full cache (key ``"full"``), for every press at
        ``compression_ratio`` and for each of ``extra_presses`` (name -> press instance), all
        from the same prefill."""
        from transformers import DynamicCache

        presses = {n: c(compression_ratio=compression_ratio) for n, c in self.press_classes.items()}
        presses.update(extra_presses or {})
        layers = self.model.model.layers
        cache = DynamicCache()
        compressed: dict[str, list] = {n: [None] * len(layers) for n in presses}

        def hook(module, args, kwargs, output):
            idx = module.layer_idx
            keys, values = cache.layers[idx].keys, cache.layers[idx].values
            for name, press in presses.items():
                compressed[name][idx] = press.compress(
                    module, kwargs["hidden_states"], keys, values, output[1], kwargs
                )
            return output

        handles = [
            layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in layers
        ]
        try:
            out = self.model(torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True)
        finally:
            for h in handles:
                h.remove()
        first = int(out.logits[0, -1].argmax())
        answers = {"full": self._decode(cache, first, len(prompt_ids), max_tokens)}
        for name, kv in compressed.items():
            c = DynamicCache()
            for idx, (k, v) in enumerate(kv):
                c.update(k, v, idx)
            answers[name] = self._decode(c, first, len(prompt_ids), max_tokens)
        return answers

    def _decode(self, cache, token: int, pos: int, max_tokens: int) -> str:
        """Greedy decode on ``cache`` from true position ``pos`` (the cache may be shorter)."""
        out = [token]
        while len(out) < max_tokens and token != self.tok.eos_token_id:
            logits = self.model(
                torch.tensor([[token]]),
                past_key_values=cache,
                position_ids=torch.tensor([[pos]]),
                cache_position=torch.tensor([pos]),
                use_cache=True,
            ).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
            pos += 1
        return self.tok.decode(out, skip_special_tokens=True)
