#!/usr/bin/env bash
# torchrun on one node: plain PyTorch DDP when the recipe has `deepspeed: null`, DeepSpeed ZeRO when it names
# a config. NPROC defaults to every visible GPU (on CPU: set it; ranks use gloo).
#   NPROC=8 bash finetune/launch/torchrun.sh finetune/recipes/instruct_understand_real.yaml
#   NPROC=2 bash finetune/launch/torchrun.sh finetune/recipes/mm_pretrain.yaml
set -euo pipefail
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
[ "${NPROC:-0}" -gt 0 ] || NPROC=1
exec torchrun --standalone --nproc_per_node "$NPROC" -m mllm.cli finetune "$@"
