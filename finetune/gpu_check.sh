#!/usr/bin/env bash
# GPU check of the finetuning path, in under 8 minutes on one H100/H200: a randomly initialised ~0.6B Llama
# trained full-weight in bf16 on synthetic text, packed 8 x 2048 tokens per step, through `mllm finetune`:
#   1. plain PyTorch (autocast bf16), sdpa attention
#   2. plain PyTorch, flash_attention_2 (skipped when flash-attn is not installed)
#   3. DeepSpeed ZeRO-2 on one GPU (bf16, fp32 masters), sdpa
# Each prints tokens/s (median of the steps after the first 10) and MFU against the card's dense bf16 peak
# (PEAK_TFLOPS, default 989: H100/H200 SXM), and the final loss. Nothing is downloaded.
#   bash finetune/gpu_check.sh            # writes under ${OUT:-/tmp}/mllm_gpu_check
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=${OUT:-/tmp}/mllm_gpu_check
STEPS=${STEPS:-60}
rm -rf "$WORK" && mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

python - "$WORK" <<'EOF'
# Synthetic text records and a tokenizer: the Mistral v1 tokenizer from mistral-common when installed,
# else a SentencePiece tokenizer trained here.
import importlib.util, json, random, shutil, sys
from pathlib import Path

work = Path(sys.argv[1])
rng = random.Random(0)
syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po", "an", "el", "or", "us", "ip"]
words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(5000)]
with open(work / "text.jsonl", "w") as f:
    for i in range(4000):
        f.write(json.dumps({"id": str(i), "text": " ".join(rng.choice(words) for _ in range(300))}) + "\n")
spec = importlib.util.find_spec("mistral_common")
tok = work / "tokenizer"
if spec is not None and (Path(spec.origin).parent / "data" / "tokenizer.model.v1").is_file():
    tok.mkdir()
    shutil.copy(Path(spec.origin).parent / "data" / "tokenizer.model.v1", tok / "tokenizer.model")
    (tok / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    vocab = 32000
else:
    from mllm.tokenizers.text import train_text_tokenizer
    vocab = 2048  # the synthetic text's 5000 words of 15 syllables hold at most ~2580 pieces
    train_text_tokenizer((json.loads(l)["text"] for l in open(work / "text.jsonl")), tok, vocab_size=vocab)
(work / "vocab").write_text(str(vocab))
EOF

VOCAB=$(cat "$WORK/vocab")
cat > "$WORK/recipe.yaml" <<EOF
output_dir: $WORK/run
model:
  base_config: {model_type: llama, hidden_size: 1536, intermediate_size: 4096, num_hidden_layers: 20,
                num_attention_heads: 12, num_key_value_heads: 4, vocab_size: $VOCAB, max_position_embeddings: 4096}
  tokenizer: $WORK/tokenizer
  media: {}
  attn_implementation: sdpa
data: {root: $WORK, train: [text.jsonl], max_length: 2048, batch_size: 8}
policy: {lm: full}
optim: {lr: 3.0e-4, betas: [0.9, 0.95], weight_decay: 0.1}
schedule: {warmup_steps: 10}
train: {max_steps: $STEPS, precision: bf16, save_every: 0, tensorboard: false, export: none, resume: false}
EOF
cat > "$WORK/zero2.json" <<'EOF'
{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
 "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
 "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto",
                                            "torch_adam": true}},
 "zero_optimization": {"stage": 2, "overlap_comm": true, "contiguous_gradients": true, "reduce_bucket_size": "auto"},
 "steps_per_print": 1000000}
EOF

report() {  # $1 label, $2 output dir
    python - "$1" "$2" "$VOCAB" <<'EOF'
import json, os, statistics, sys
label, out, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
tps = statistics.median(r["tokens_per_s"] for r in rows[10:])
h, inter, layers, seq = 1536, 4096, 20, 2048
kv = h // 12 * 4
matmul = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + vocab * h  # weights that multiply every token
flops_per_token = 6 * matmul + 6 * layers * h * seq  # + causal attention scores and values, forward and backward
peak = float(os.environ.get("PEAK_TFLOPS", 989)) * 1e12
print(f"{label:<34} {tps:>10,.0f} tok/s   MFU {100 * tps * flops_per_token / peak:5.1f}%   "
      f"final loss {rows[-1]['loss']:.3f}   ({matmul / 1e6:.0f}M matmul params)")
EOF
}

results=()
run_arm() {  # $1 label, $2 output dir, then the command
    local label=$1 out=$2; shift 2
    echo "== $label"
    if timeout 150 "$@" output_dir="$out" > "$out.log" 2>&1; then
        results+=("$(report "$label" "$out")")
    else
        results+=("$(printf '%-34s failed, see %s' "$label" "$out.log")")
        tail -20 "$out.log"
    fi
}

run_arm "torch bf16 + sdpa" "$WORK/sdpa" python -m mllm.cli finetune "$WORK/recipe.yaml"
if python -c "import flash_attn" 2>/dev/null; then
    run_arm "torch bf16 + flash_attention_2" "$WORK/fa2" python -m mllm.cli finetune "$WORK/recipe.yaml" \
        model.attn_implementation=flash_attention_2
else
    results+=("$(printf '%-34s skipped: flash-attn is not installed' 'torch bf16 + flash_attention_2')")
fi
if python -c "import deepspeed" 2>/dev/null; then
    run_arm "deepspeed zero2 bf16 + sdpa" "$WORK/zero2" deepspeed --no_local_rank --num_gpus 1 --module mllm.cli \
        finetune "$WORK/recipe.yaml" deepspeed="$WORK/zero2.json" model.dtype=bfloat16
else
    results+=("$(printf '%-34s skipped: deepspeed is not installed' 'deepspeed zero2 bf16 + sdpa')")
fi
echo
printf '%s\n' "${results[@]}"
