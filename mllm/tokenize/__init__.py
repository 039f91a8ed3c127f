"""Training, encoding, decoding and evaluating media tokenizers (`mllm tokenize ...`)."""
