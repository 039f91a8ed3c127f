"""`mllm serve`: an OpenAI-compatible HTTP server and a web page over a Pipeline."""

from mllm.serve.limits import ServeLimits

__all__ = ["ServeLimits"]
