"""Training, encoding, decoding and evaluating media tokenizers (`mllm tokenize ...`).

Importing this package registers every recipe module below.
"""
