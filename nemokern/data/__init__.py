"""Data: tokenizers (tokenizer.py: a local HF tokenizer directory, or the built-in byte one)."""
