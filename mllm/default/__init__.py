"""The embedded default model: a tiny any-to-any model trained by the project's own recipes, shipped in the package.

`default_checkpoint()` finds it; `mllm default train` (mllm.default.build) remakes it. See docs/default_model.md.
"""

from mllm.default.paths import VARIANTS, default_checkpoint

__all__ = ["VARIANTS", "default_checkpoint"]
