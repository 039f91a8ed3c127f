"""The multimodal LM: a wrapper around any HF causal LM, its config and its projectors.

Importing this package registers `MultimodalConfig`/`MultimodalLM` with the HF
Auto classes, so `AutoModelForCausalLM.from_pretrained(dir)` loads an mllm
checkpoint without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from mllm.model.configuration import MultimodalConfig
from mllm.model.modeling import MultimodalLM, MultimodalLMOutput
from mllm.model.projector import list_projectors

AutoConfig.register(MultimodalConfig.model_type, MultimodalConfig, exist_ok=True)
AutoModelForCausalLM.register(MultimodalConfig, MultimodalLM, exist_ok=True)

__all__ = ["MultimodalConfig", "MultimodalLM", "MultimodalLMOutput", "list_projectors"]
