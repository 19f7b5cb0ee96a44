import sys

from benchmarks.eval import main

sys.exit(main())
