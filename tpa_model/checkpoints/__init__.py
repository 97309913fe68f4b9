"""Checkpoints in and out: Hugging Face safetensors, GGUF files (reader and dequantizers), our TPA checkpoints
with their provenance, the loader that builds a model from any of them, and the models known by name."""
