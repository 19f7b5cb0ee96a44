import sys

from vllm_caote.bench.loadtest import main

sys.exit(main())
