#!/usr/bin/env bash
# One process: a laptop CPU or one GPU. The recipe says everything; extra arguments are dotted overrides.
#   bash finetune/launch/single.sh finetune/recipes/mm_pretrain.yaml train.max_steps=50
set -euo pipefail
exec mllm finetune "$@"
