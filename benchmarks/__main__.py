"""``python -m benchmarks``: the engine benchmark (:mod:`benchmarks.engine`)."""

import sys

from benchmarks.engine import main

if __name__ == "__main__":
    sys.exit(main())
