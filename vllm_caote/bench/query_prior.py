"""Measure a model's query prior for ``prefill_base: query-prior`` (see
:mod:`vllm_caote.engine.prior`).

    python -m vllm_caote.bench.query_prior --model <model dir> [--out FILE]

Runs calibration prompts through the model with Hugging Face transformers (no vLLM engine) and
averages, per layer and query head, the pre-RoPE query of every token from the prompt's last
blank line on (the question and the chat template's answer prompt): what the model looks for
when it reads a context back. The prompts are multi-key retrieval prompts (RULER's MK-NIAH:
four labelled numbers in the essays or the KJV, one asked for), a template and a question the
passkey benchmarks do not use, with their own keys and haystack offsets (``--seed``). The file
goes next to the model (``caote_query_prior.st``), where the server finds it.

Queries are read where the model forms them: the output of ``self_attn.q_norm`` when the layer
has one (Qwen3, Gemma 3), else of ``self_attn.q_proj``; a decoder whose attention has neither
is refused by name.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from vllm_caote.engine.prior import PRIOR_FILE, QueryPrior


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vllm_caote.bench.query_prior", description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--model", required=True, help="Hugging Face model folder (or hub id)")
    p.add_argument("--out", default=None, help=f"output file (default: <model>/{PRIOR_FILE})")
    p.add_argument("--prompts", type=int, default=12, help="calibration prompts (default 12)")
    p.add_argument("--context-tokens", type=int, default=1536)
    p.add_argument("--seed", type=int, default=1000, help="keys and haystack offsets")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    return p.parse_args(argv)


def decoder_layers(model) -> list:
    """The decoder layers (modules with a ``self_attn``), in order."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and hasattr(mod[0], "self_attn"):
            return list(mod)
    raise SystemExit(f"{type(model).__name__}: no decoder layers with `self_attn` found")


def query_module(layer, index: int):
    attn = layer.self_attn
    for name in ("q_norm", "q_proj"):
        mod = getattr(attn, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    raise SystemExit(
        f"layer {index}: {type(attn).__name__} has neither q_norm nor q_proj; this tool reads "
        "pre-RoPE queries from one of them"
    )


def question_start(tokenizer, prompt: str) -> tuple[list[int], int]:
    """The prompt's token ids and the index of its first token from the last blank line on."""
    enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
    cut = prompt.rfind("\n\n")
    first = next(t for t, (a, b) in enumerate(enc["offset_mapping"]) if b > cut)
    return enc["input_ids"], first


def measure(model, tokenizer, prompts: list[str], head_dim: int, device) -> torch.Tensor:
    """``[L, Hq, d]``: the mean pre-RoPE query over every prompt's question tokens."""
    layers = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        query_module(layer, i).register_forward_hook(
            lambda m, x, y, i=i: captured.__setitem__(i, y.detach())
        )
        for i, layer in enumerate(layers)
    ]
    sums, count = None, 0
    t0 = time.monotonic()
    try:
        for j, prompt in enumerate(prompts):
            ids, first = question_start(tokenizer, prompt)
            with torch.no_grad():
                model(input_ids=torch.tensor([ids], device=device))
            qs = [captured[i].reshape(len(ids), -1, head_dim)[first:].float() for i in range(len(layers))]  # fmt: skip
            batch = torch.stack([q.sum(0) for q in qs]).cpu()  # [L, Hq, d]
            sums = batch if sums is None else sums + batch
            count += len(ids) - first
            print(
                f"  prompt {j + 1}/{len(prompts)}: {len(ids)} tokens, {len(ids) - first} "
                f"question tokens ({time.monotonic() - t0:.0f} s)",
                file=sys.stderr,
            )
    finally:
        for h in hooks:
            h.remove()
    return sums / count


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_caote.bench.tasks import retrieval_suite

    out = Path(args.out) if args.out else Path(args.model) / PRIOR_FILE
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config  # fmt: skip
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cases = retrieval_suite(tok, args.context_tokens, args.prompts, tasks=("multikey",), seed=args.seed)  # fmt: skip
    print(f"query prior of {args.model}: {len(cases)} multi-key prompts", file=sys.stderr)
    mean = measure(model, tok, [c.prompt for c in cases], head_dim, args.device)
    if mean.shape[1] != cfg.num_attention_heads:
        raise SystemExit(f"read {mean.shape[1]} query heads, the config says {cfg.num_attention_heads}")  # fmt: skip
    QueryPrior(mean).save(
        out,
        {
            "model": str(args.model),
            "calibration": f"{len(cases)} multi-key retrieval prompts of {args.context_tokens} "
            f"tokens, seed {args.seed}; mean pre-RoPE query from the last blank line on",
        },
    )
    print(f"wrote {out} ({tuple(mean.shape)} = layers x query heads x head size)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
