"""mllm: unified autoregressive multimodal LLMs on any HF causal LM."""

__version__ = "0.1.0"
