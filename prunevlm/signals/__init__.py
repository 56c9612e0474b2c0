"""Pure helpers that turn tensors captured from a model into method signals (no transformers import)."""
