"""Greedy generations from stock vLLM (plugin disabled), for the no-op invariant.

Run as a script in its own process: ``CAOTE_DISABLE=1 python tests/helpers/stock_generate.py IN OUT``
where IN is a JSON list of {"prompt_token_ids": [...], "max_tokens": n}.
"""

import json
import os
import sys

if __name__ == "__main__":
    assert os.environ.get("CAOTE_DISABLE") == "1"
    from vllm import LLM, SamplingParams

    from vllm_caote.models import engine_dtype, model_dir

    cases = json.load(open(sys.argv[1]))
    llm = LLM(
        model=str(model_dir()),
        dtype=engine_dtype(),
        max_model_len=4096,
        enable_prefix_caching=False,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
    )
    prompts = [{"prompt_token_ids": c["prompt_token_ids"]} for c in cases]
    params = [SamplingParams(temperature=0, max_tokens=c["max_tokens"]) for c in cases]
    outs = llm.generate(prompts, params, use_tqdm=False)
    json.dump([list(o.outputs[0].token_ids) for o in outs], open(sys.argv[2], "w"))
