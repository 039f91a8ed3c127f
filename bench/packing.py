"""Packing: the non-pad share and packed over pad-to-longest throughput: `mllm bench --only packing` (mllm/bench/packing.py, docs/performance.md).

    python bench/packing.py [--quick] [--repeats N] [--out bench]
"""

import sys

from mllm.bench.suite import main

sys.exit(main(["--only", "packing", *sys.argv[1:]]))
