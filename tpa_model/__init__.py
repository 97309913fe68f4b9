"""Gemma 3 with Tensor Product Attention: the model, its caches, loading and conversion."""

from .checkpoint import CheckpointError
from .config import PRESETS, TextConfig, TPAConfig, preset, text_config_from_hf
from .convert import ConversionReport, reduce_rank
from .kv_cache import CacheSpec, ContiguousKVCache, KVCache, layer_cache_specs
from .loader import load_model, save_model
from .metadata import AttentionMetadata, build_metadata
from .model import GemmaTPAModel

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
