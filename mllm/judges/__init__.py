"""Judges: independent models that score what the tokenizers and the LM produce (never trained on their outputs)."""

from mllm.judges.digits import DigitJudge, digit_images

__all__ = ["DigitJudge", "digit_images"]
