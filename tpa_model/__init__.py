"""Gemma 3 with Tensor Product Attention: the model, its factor cache, loading and conversion."""

from .attention import Factors, factor_attention
from .cache import ContiguousFactorCache, FactorCache
from .checkpoint import CheckpointError
from .config import PRESETS, TextConfig, TPAConfig, preset, text_config_from_hf
from .convert import ConversionReport, reduce_rank
from .loader import load_model, save_model
from .model import GemmaTPAModel

__all__ = [
    "CheckpointError",
    "ContiguousFactorCache",
    "ConversionReport",
    "FactorCache",
    "Factors",
    "GemmaTPAModel",
    "PRESETS",
    "TPAConfig",
    "TextConfig",
    "factor_attention",
    "load_model",
    "preset",
    "reduce_rank",
    "save_model",
    "text_config_from_hf",
]
