"""Data: built-in offline corpora (records) -> token cache -> packed batches."""
