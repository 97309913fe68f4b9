"""The built-in demo model: a tiny random Gemma 3 TPA checkpoint with a tokenizer trained on the spot.

It lets a new user run every command with no download. Its weights are random, so its text is noise;
what it shows is the whole path working: tokenizer, chat template, model, factor cache, sampling.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..model.config import preset
from ..model.decoder import GemmaTPAModel
from ..model.vision import VisionConfig
from ..tokenizers.gemma_tokenizer import DEMO_CORPUS, GemmaTokenizer, train_sentencepiece
from .loader import save_model

DEMO_VERSION = 1
DEMO_SEED = 0


def cache_root() -> Path:
    return Path(os.environ.get("GEMMA_TPA_CACHE", Path.home() / ".cache" / "gemma-tpa"))


def init_weights(model: GemmaTPAModel, seed: int, std: float = 0.02) -> None:
    """Gemma-style random init: normal weights, zero Gemma norm weights ((1 + w) = 1), unit LayerNorms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("head_basis"):
                param.copy_(torch.eye(*param.shape))
            elif name.startswith("vision_tower.") and "norm" in name:  # LayerNorm: weight 1, bias 0
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif "norm" in name or name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def build_demo(out: Path) -> None:
    tokenizer = GemmaTokenizer(train_sentencepiece(out / "tokenizer.model", DEMO_CORPUS, vocab_size=512))
    config = dataclasses.replace(
        preset("tiny"),
        vocab_size=tokenizer.vocab_size,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=sorted(tokenizer.stop_token_ids),
        pad_token_id=tokenizer.pad_id,
    )
    vision = VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
        patch_size=14, mm_tokens_per_image=4,
    )
    model = GemmaTPAModel(config, vision, image_token_id=tokenizer.image_token_id)
    init_weights(model, DEMO_SEED)
    save_model(model, out)


def demo_model_dir() -> Path:
    """Path of the demo checkpoint, built once into the cache directory ($GEMMA_TPA_CACHE)."""
    out = cache_root() / f"demo-v{DEMO_VERSION}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=out.parent))
    try:
        build_demo(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
