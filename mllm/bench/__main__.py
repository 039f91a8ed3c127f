import sys

from mllm.bench.suite import main

sys.exit(main())
