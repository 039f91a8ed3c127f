"""Media tokenizers and de-tokenizers (image, video, audio): `mllm bench --only tokenizers` (mllm/bench/tokenizers.py, docs/performance.md).

    python bench/tokenizers_video.py [--quick] [--repeats N] [--out bench]
"""

import sys

from mllm.bench.suite import main

sys.exit(main(["--only", "tokenizers", *sys.argv[1:]]))
