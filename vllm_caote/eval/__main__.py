import sys

from vllm_caote.eval import main

sys.exit(main())
