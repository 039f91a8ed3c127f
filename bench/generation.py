"""Generation: tokens/s of each span type against HF generate: `mllm bench --only generation` (mllm/bench/generation.py, docs/performance.md).

    python bench/generation.py [--quick] [--repeats N] [--out bench]
"""

import sys

from mllm.bench.suite import main

sys.exit(main(["--only", "generation", *sys.argv[1:]]))
