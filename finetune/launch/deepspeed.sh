#!/usr/bin/env bash
# DeepSpeed on one node, one rank per GPU. NUM_GPUS defaults to every visible GPU; on a CPU box it sets the
# number of CPU ranks (gloo). The recipe's `deepspeed` names the ZeRO config; override it on the command line.
#   bash finetune/launch/deepspeed.sh finetune/recipes/mm_pretrain_real.yaml
#   NUM_GPUS=2 bash finetune/launch/deepspeed.sh finetune/recipes/mm_pretrain.yaml deepspeed=finetune/deepspeed/zero2.json
set -euo pipefail
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
[ "${NUM_GPUS:-0}" -gt 0 ] || NUM_GPUS=1
# --no_local_rank: ranks read LOCAL_RANK from the environment, so mllm's own arguments stay as they are
exec deepspeed --no_local_rank --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
    --module mllm.cli finetune "$@"
