"""Models: loading the base (4-bit or 16-bit), its tokenizer, LoRA, and the ways a model is read or run."""
