#!/usr/bin/env bash
# Every tiny stage in order, one CPU process each, on the built corpora (`mllm data build` first):
# text pretraining -> alignment -> multimodal pretraining -> instruction tuning (comprehension, generation),
# and the one-stage combined recipe. Each stage starts from the `final/` the one before it exports.
#   bash finetune/launch/tiny_stages.sh                      # extra arguments go to every stage
set -euo pipefail
cd "$(dirname "$0")/../.."
for stage in text_pretrain align mm_pretrain instruct_understand instruct_generate combined; do
    echo "== $stage"
    mllm finetune "finetune/recipes/$stage.yaml" "$@"
done
