"""LongBench-style single-document and multi-document QA, scored with token F1.

For users with a GPU and a real model (Llama-3.1-8B, Qwen2.5, ...). The data is LongBench's own
release (THUDM/LongBench, ``data.zip`` of ``<subset>.jsonl`` files with ``context``, ``input``,
``answers``): give ``--longbench-dir`` (a folder holding ``<subset>.jsonl``, e.g. the unpacked
``data/``), or let :func:`load` fetch ``data.zip`` from the Hugging Face hub where one is
reachable. Nothing is fetched unless the task is asked for.

Prompts are one generic instruction (not LongBench's per-subset templates), contexts longer
than ``max_context`` tokens are cut in the middle (LongBench's convention: the start and the
end of a document carry most of the answers), and the score is the SQuAD token F1 against the
best reference answer, the metric LongBench uses for its QA subsets.
"""

from __future__ import annotations

import json
import re
import string
import zipfile
from collections import Counter
from pathlib import Path

#: LongBench's English QA subsets (scored with qa_f1 there too)
QA_SUBSETS = (
    "narrativeqa",
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "musique",
)

PROMPT = (
    "Read the text below and answer the question. Answer as concisely as you can, with a "
    "single phrase if possible, and give no explanation.\n\n{context}\n\n"
    "Question: {input}\nAnswer:"
)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse whitespace (SQuAD)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, answers: list[str]) -> float:
    """F1 of the first line of the prediction against the best-matching reference."""
    first = prediction.strip().split("\n", 1)[0] if prediction.strip() else ""
    return max((token_f1(first, a) for a in answers), default=0.0)


def _fetch_zip(cache: Path) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                "THUDM/LongBench", "data.zip", repo_type="dataset", cache_dir=str(cache)
            )
        )
    except Exception as e:  # no hub, no network, gated...
        raise RuntimeError(
            f"cannot fetch LongBench from the Hugging Face hub ({type(e).__name__}: {e}); "
            "download THUDM/LongBench data.zip yourself and pass --longbench-dir <unpacked data/>"
        ) from e


def load(subset: str, data_dir: str | None, limit: int, cache: Path) -> list[dict]:
    """The first ``limit`` records of ``subset`` (fixed order: reproducible)."""
    if data_dir:
        path = Path(data_dir) / f"{subset}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found (--longbench-dir holds <subset>.jsonl)")
        lines = path.read_text().splitlines()
    else:
        with zipfile.ZipFile(_fetch_zip(cache)) as z:
            lines = z.read(f"data/{subset}.jsonl").decode().splitlines()
    out = []
    for line in lines:
        if line.strip():
            rec = json.loads(line)
            out.append(
                dict(
                    id=rec.get("_id") or str(len(out)),
                    context=rec["context"],
                    input=rec["input"],
                    answers=list(rec["answers"]),
                )
            )
        if len(out) >= limit:
            break
    return out


def build_prompt(tokenizer, rec: dict, max_context: int) -> tuple[str, int]:
    """Chat-formatted prompt with the context cut in the middle to ``max_context`` tokens.

    Returns (prompt, context tokens kept).
    """
    ids = tokenizer.encode(rec["context"], add_special_tokens=False)
    if len(ids) > max_context:
        half = max_context // 2
        context = tokenizer.decode(ids[:half]) + tokenizer.decode(ids[-half:])
        n = 2 * half
    else:
        context, n = rec["context"], len(ids)
    text = PROMPT.format(context=context, input=rec["input"])
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text, n
