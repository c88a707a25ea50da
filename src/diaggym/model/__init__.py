"""The world model's local base: tokenizer and a small Qwen2 built from a config (no downloads)."""
