#!/usr/bin/env bash
# DeepSpeed across nodes. Run it on the first node of the hostfile: the launcher starts every node's ranks
# over ssh (pdsh), in this same directory. Needs passwordless ssh between the nodes, the same checkout and
# environment on each, and output_dir plus the data on a shared filesystem: every rank writes its own part
# of the optimizer state into each checkpoint, and a resume reads them back on the same number of ranks.
#   HOSTFILE=my_hosts bash finetune/launch/multinode.sh finetune/recipes/combined_real.yaml
# Without pdsh, start `torchrun --nnodes N --node_rank I --master_addr HOST0 --nproc_per_node 8 -m mllm.cli
# finetune RECIPE` on every node yourself.
set -euo pipefail
HOSTFILE=${HOSTFILE:-finetune/launch/hostfile.example}
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    --no_local_rank --module mllm.cli finetune "$@"
