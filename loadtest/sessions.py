"""Multi-turn conversations through the real OpenAI server: stock vs a budget (issue 31).

    python -m loadtest.sessions --start-server      # make bench-sessions

``--conversations`` conversations of ``--turns`` turns, one after the other, each over its own
document (``--doc-tokens`` tokens of essay text after a first sentence that states a secret
passkey). Every turn is a streamed completion whose prompt is the previous turn's prompt, the
previous answer's token ids and the next user message in the model's ChatML turns (token ids,
as a chat front-end's re-rendered history would be after tokenization, so the history the
server sees is exactly what it computed). Each conversation runs twice: stock (``kv_budget:
0``: vLLM's prefix cache serves the history) and with ``--budget`` (the kept compacted cache
of the previous turn serves it, ``kv_eviction.resumed_tokens``). The last turn asks for the
passkey, its answer started with "The secret passkey is" (as RULER does, so the small model
answers with the number rather than a description); in the budgeted run it is sent a second time, which re-reads the whole history at
the same budget (the kept cache went to the first). Per turn: time to first token, prompt
tokens computed (prompt minus cached, from ``usage.prompt_tokens_details``), the
``kv_eviction`` stats. JSON + Markdown + PNG under ``--out`` (``sessions.*``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import urllib.request
from pathlib import Path

from benchmarks import provenance

QUESTIONS = [
    "Summarise the first paragraph in one sentence.",
    "What is the author's main argument?",
    "Name one example the author gives.",
    "What would a critic say about it?",
    "How does the text end?",
    "Give the document a title.",
]
FINAL = "What is the secret passkey? Answer with the number only."
ANSWER_PREFIX = "The secret passkey is"
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
FIRST_USER = "<|im_start|>user\nThe secret passkey is {key}. Remember it. Read the document.\n\n"
#: closes the assistant's (ignore_eos, fixed-length) answer and opens the next user turn
NEXT_USER = "<|im_end|>\n<|im_start|>user\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"


def passkey(conversation: int) -> str:
    return str(random.Random(f"sessions-{conversation}").randint(10000, 99999))


def _post_stream(url: str, body: dict, timeout: float = 600) -> dict:
    """One streamed completion: ``{ttft, latency, token_ids, text, usage, kv_eviction}``."""
    req = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    out = {"ttft": None, "token_ids": [], "text": "", "usage": None, "kv_eviction": None}
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for ch in chunk.get("choices") or ():
                if out["ttft"] is None and (ch.get("text") or ch.get("token_ids")):
                    out["ttft"] = time.perf_counter() - t0
                out["token_ids"] += ch.get("token_ids") or []
                out["text"] += ch.get("text") or ""
            if chunk.get("usage"):
                out["usage"] = chunk["usage"]
            if chunk.get("kv_eviction"):
                out["kv_eviction"] = chunk["kv_eviction"]
    out["latency"] = time.perf_counter() - t0
    return out


def _turn(url, model, prompt_ids, args, budget) -> dict:
    body = {
        "model": model, "prompt": prompt_ids, "max_tokens": args.output_tokens,
        "temperature": 0.0, "ignore_eos": True, "stream": True, "return_token_ids": True,
        "stream_options": {"include_usage": True}, "kv_budget": budget or 0,
    }  # fmt: skip
    if budget:
        body["kv_policy"] = args.policy
    r = _post_stream(url, body)
    usage = r["usage"] or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    st = r["kv_eviction"] or {}
    return {
        "prompt_tokens": len(prompt_ids),
        "cached_tokens": cached,
        "computed_tokens": len(prompt_ids) - cached,
        "ttft_s": r["ttft"],
        "latency_s": r["latency"],
        "resumed_tokens": st.get("resumed_tokens"),
        "peak_blocks": st.get("peak_blocks"),
        "own_peak_blocks": st.get("own_peak_blocks"),
        "evicted_tokens": st.get("evicted_tokens"),
        "text": r["text"],
        "_ids": r["token_ids"],
    }


def conversation(url, model, tok, doc_ids, key, args, budget) -> list[dict]:
    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    prompt = enc(SYSTEM + FIRST_USER.format(key=key)) + doc_ids
    turns = []
    for i in range(args.turns):
        last = i == args.turns - 1
        q = FINAL if last else QUESTIONS[i % len(QUESTIONS)]
        user = ("\n\n" if i == 0 else NEXT_USER) + q + ASSISTANT + (ANSWER_PREFIX if last else "")
        prompt = prompt + enc(user)
        t = _turn(url, model, prompt, args, budget)
        if last:
            t["correct"] = key in t["text"]
            if budget:  # the same prompt again: the kept cache is gone, so it re-reads it all
                again = _turn(url, model, prompt, args, budget)
                t["reread"] = {k: again[k] for k in ("ttft_s", "computed_tokens", "text")}
                t["reread"]["resumed_tokens"] = again["resumed_tokens"]
                t["reread"]["correct"] = key in again["text"]
        prompt = prompt + t.pop("_ids")
        turns.append(t)
    return turns


def _ratio(a, b):
    return a / b if a and b else None


def summarise(runs: dict) -> dict:
    stock, bud = runs["stock"], runs["budget"]
    n = len(stock[0])
    per_turn = []
    for i in range(n):
        s = [c[i]["ttft_s"] for c in stock]
        b = [c[i]["ttft_s"] for c in bud]
        per_turn.append({  # TTFT: the median over conversations, token counts: the mean
            "turn": i + 1,
            "stock_ttft_s": statistics.median(s), "budget_ttft_s": statistics.median(b),
            "stock_computed": sum(c[i]["computed_tokens"] for c in stock) / len(stock),
            "budget_computed": sum(c[i]["computed_tokens"] for c in bud) / len(bud),
            "budget_resumed": sum(c[i]["resumed_tokens"] or 0 for c in bud) / len(bud),
            "budget_peak_blocks": max(c[i]["peak_blocks"] or 0 for c in bud),
        })  # fmt: skip
    last = per_turn[-1]
    tot_s = sum(t["stock_ttft_s"] for t in per_turn)
    tot_b = sum(t["budget_ttft_s"] for t in per_turn)
    reread = [c[-1]["reread"]["ttft_s"] for c in bud]
    return {
        "per_turn": per_turn,
        "ttft_last_ratio": _ratio(last["budget_ttft_s"], last["stock_ttft_s"]),
        "ttft_sum_ratio": _ratio(tot_b, tot_s),
        "reread_last_ttft_s": statistics.median(reread),
        "correct_last": {
            "stock": sum(c[-1]["correct"] for c in stock),
            "budget_resumed": sum(c[-1]["correct"] for c in bud),
            "budget_reread": sum(c[-1]["reread"]["correct"] for c in bud),
            "of": len(bud),
        },
    }


def render_md(result: dict) -> str:
    s, a = result["summary"], result["args"]
    lines = [
        "# Conversations under a budget: kept compacted caches (issue 31)",
        "",
        *provenance.markdown(result),
        f"{a['conversations']} conversations x {a['turns']} turns over a {a['doc_tokens']}-token "
        f"document, {a['output_tokens']} output tokens a turn, `kv_budget: {a['budget']}` "
        f"(`{a['policy']}`) vs stock, one request at a time through the OpenAI server "
        f"(`{result['model']}`, {result.get('device', 'CPU')}).",
        "",
        f"- TTFT of the last turn, budget / stock: **{s['ttft_last_ratio']:.2f}x**",
        f"- TTFT summed over the turns, budget / stock: **{s['ttft_sum_ratio']:.2f}x**",
        f"- last turn re-reading the whole history at the same budget: "
        f"{s['reread_last_ttft_s'] * 1000:.0f} ms TTFT",
        f"- passkey from the document's first sentence at the last turn: stock "
        f"{s['correct_last']['stock']}/{s['correct_last']['of']}, budget resumed "
        f"{s['correct_last']['budget_resumed']}/{s['correct_last']['of']}, budget re-read "
        f"{s['correct_last']['budget_reread']}/{s['correct_last']['of']}",
        "",
        "| turn | stock TTFT ms | budget TTFT ms | stock prompt tokens computed | budget prompt "
        "tokens computed | budget resumed tokens | budget peak blocks |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in s["per_turn"]:
        lines.append(
            f"| {t['turn']} | {t['stock_ttft_s'] * 1000:.0f} | {t['budget_ttft_s'] * 1000:.0f} | "
            f"{t['stock_computed']:.0f} | {t['budget_computed']:.0f} | "
            f"{t['budget_resumed']:.0f} | {t['budget_peak_blocks']} |"
        )
    notes = result.get("notes") or []
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def plot(result: dict, out_dir: Path, tag: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pt = result["summary"]["per_turn"]
    x = [t["turn"] for t in pt]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(x, [t["stock_ttft_s"] * 1000 for t in pt], "o-", label="stock")
    ax[0].plot(x, [t["budget_ttft_s"] * 1000 for t in pt], "s-", label="budget (resumed)")
    ax[0].set(xlabel="turn", ylabel="TTFT (ms)", title="Time to first token")
    ax[1].plot(x, [t["stock_computed"] for t in pt], "o-", label="stock")
    ax[1].plot(x, [t["budget_computed"] for t in pt], "s-", label="budget (resumed)")
    ax[1].set(xlabel="turn", ylabel="tokens", title="Prompt tokens computed")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out_dir) / f"{tag}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


def main(argv=None) -> int:
    from benchmarks.eval.common import resolve_model, write_results
    from benchmarks.tasks import filler_prompt_ids
    from loadtest.server import serving

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--start-server", action="store_true")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None)
    p.add_argument("--served-model-name", default="smollm2")
    p.add_argument(
        "--server-args",
        default="--enable-prompt-tokens-details --enforce-eager --max-model-len 4096",
    )
    p.add_argument("--conversations", type=int, default=12)
    p.add_argument("--turns", type=int, default=7)
    p.add_argument("--doc-tokens", type=int, default=1500)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--policy", default="caote-snapkv")
    p.add_argument("--out", help="output folder (default benchmarks/results/<tag>/)")
    p.add_argument("--tag", default="sessions")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(args.model))
    out = provenance.out_dir(args.out, args.tag)
    runs: dict[str, list] = {"stock": [], "budget": []}
    with serving(args, out / f"{args.tag}_server.log") as (url, cmd):
        for c in range(args.conversations):
            for mode, budget in (("stock", None), ("budget", args.budget)):
                # each conversation and mode its own document: no prefix shared across runs
                offset = 2 * args.doc_tokens * c + (0 if mode == "stock" else args.doc_tokens)
                doc = filler_prompt_ids(tok, args.doc_tokens, offset)
                runs[mode].append(conversation(url, args.served_model_name, tok, doc, passkey(c),
                                               args, budget))  # fmt: skip
                print(f"conversation {c + 1} {mode}: TTFT per turn (ms)",
                      [round(t["ttft_s"] * 1000) for t in runs[mode][-1]], flush=True)  # fmt: skip
    result = {
        "provenance": provenance.record("loadtest.sessions", argv),
        "notes": [
            "TTFT per turn: the median over the conversations; prompt tokens computed and "
            "resumed: the mean.",
            "Stock's prefix cache hits whole blocks only, so each stock turn recomputes the "
            "partial last block of the history too; a resumed turn computes only its new "
            "tokens. Budget peak blocks: the most any conversation held at that turn.",
            "The budgeted last turn is sent twice: the first resumes (its TTFT is the table's), "
            "the second finds the kept cache taken and re-reads the whole history at the same "
            "budget (the behaviour before kept caches).",
        ],
        "args": vars(args),
        "model": args.served_model_name,
        "server_cmd": cmd,
        "summary": summarise(runs),
        "runs": runs,
    }
    print(write_results(out, args.tag, result, render_md, plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
