import sys

from vllm_caote.bench.eval import main

sys.exit(main())
