"""Measuring a GGUF as llama.cpp's users do: perplexity (llama-perplexity) and speed (llama-bench)."""
