#!/usr/bin/env bash
# GPU benchmark, within 8 minutes on one H100: bf16 training tokens/s and MFU of a ~1B Llama (sdpa vs
# flash-attn 2) and generation tokens/s against HF generate. Prints a Markdown block for docs/performance.md.
#
#   bash bench/gpu.sh              # wheels for flash-attn (and anything missing) in $WHEELS (default: wheels/)
#
# Nothing is downloaded: packages come from the wheels carried in; a missing flash-attn wheel only
# drops the flash-attn row.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-wheels}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # mllm from this checkout, installed or not

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [ -d "$WHEELS" ]; then
    for pkg in torch transformers safetensors einops flash_attn; do
        python3 -c "import $pkg" 2>/dev/null || \
            pip install --no-index --find-links "$WHEELS" "${pkg//_/-}" || echo "gpu.sh: no wheel for $pkg in $WHEELS"
    done
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__)"
timeout 450 python3 bench/gpu.py "$@"
