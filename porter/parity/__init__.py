"""Parity: the same inputs through transformers and the ggml runtime, compared."""
