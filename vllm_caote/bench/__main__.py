"""``python -m vllm_caote.bench``: the engine benchmark (:mod:`vllm_caote.bench.engine`)."""

import sys

from vllm_caote.bench.engine import main

if __name__ == "__main__":
    sys.exit(main())
