"""Gemma 3 with Tensor Product Attention: the model, its caches, loading and conversion."""

from .cache.kv_cache import CacheSpec, ContiguousKVCache, KVCache, layer_cache_specs
from .cache.metadata import AttentionMetadata, build_metadata
from .checkpoints.loader import load_model, save_model
from .checkpoints.safetensors_files import CheckpointError
from .compression.convert import ConversionReport, reduce_rank
from .model.config import PRESETS, TextConfig, TPAConfig, preset, text_config_from_hf
from .model.decoder import GemmaTPAModel

__all__ = [
    "AttentionMetadata",
    "CacheSpec",
    "CheckpointError",
    "ContiguousKVCache",
    "ConversionReport",
    "GemmaTPAModel",
    "KVCache",
    "PRESETS",
    "TPAConfig",
    "TextConfig",
    "build_metadata",
    "layer_cache_specs",
    "load_model",
    "preset",
    "reduce_rank",
    "save_model",
    "text_config_from_hf",
]
