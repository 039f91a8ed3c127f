"""Finetuning: LoRA or full weights, one recipe from a laptop CPU process to DeepSpeed ZeRO-3 on many GPUs.

    from mllm.train import load_recipe, finetune, export_checkpoint

    cfg = load_recipe("finetune/recipes/mm_pretrain.yaml", ["train.max_steps=100"])
    final = finetune(cfg)                                   # <output_dir>/final, LoRA merged
    export_checkpoint("runs/x/checkpoints/step-00000100", "runs/x/merged", merge_lora=True)

recipe.py (typed FinetuneConfig, checks) -> policy.py (what trains) -> distributed.py (ranks,
torch or DeepSpeed engine) -> checkpointing.py (atomic step checkpoints, resume, export) -> loop.py.
"""

from mllm.train.checkpointing import export_checkpoint
from mllm.train.loop import NonFiniteLossError, finetune
from mllm.train.policy import apply_policy, merge, trainable_summary
from mllm.train.recipe import FinetuneConfig, check_ready, load_recipe

__all__ = ["FinetuneConfig", "NonFiniteLossError", "apply_policy", "check_ready", "export_checkpoint", "finetune",
           "load_recipe", "merge", "trainable_summary"]
