"""load_model / save_model: the one entry point from a directory on disk to a ready model."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import (
    TPA_MODEL_TYPE,
    CheckpointError,
    TensorFiles,
    hf_language_prefix,
    hf_name,
    is_tpa_checkpoint,
    load_weights,
    parse_text_config,
    read_config,
    save_tpa_checkpoint,
)
from .config import TPA_ARCHITECTURE
from .convert import ConversionReport, RankSpec, reduce_rank
from .model import GemmaTPAModel


def load_model(
    path: str | Path,
    *,
    k_rank: RankSpec = None,
    v_rank: RankSpec = None,
    q_rank: RankSpec = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> GemmaTPAModel:
    """Load a Hugging Face Gemma 3 directory (converted on load) or a TPA checkpoint saved by tpa-convert.

    Ranks left as None keep the checkpoint's own (exact for Hugging Face checkpoints); lower ranks are
    reached by weight-space conversion. The conversion report is kept on `model.conversion_report`.
    """
    path = Path(path)
    raw = read_config(path)
    config = parse_text_config(path, raw)
    files = TensorFiles(path)
    try:
        with torch.device("meta"):
            model = GemmaTPAModel(config).to(dtype)
        names = [n for n, _ in model.named_parameters()]
        if is_tpa_checkpoint(raw):
            name_map = {n: n for n in names}
        else:
            prefix = hf_language_prefix(files.keys())
            name_map = {n: hf_name(n, prefix) for n in names}
        load_weights(model, files, name_map, dtype, device)
    finally:
        files.close()
    model.eval()
    model.source_path = path
    model.conversion_report = None
    if any(r is not None for r in (k_rank, v_rank, q_rank)):
        try:
            model.conversion_report = reduce_rank(model, k_rank, v_rank, q_rank, progress=False)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
    return model


def save_model(model: GemmaTPAModel, out: str | Path, tokenizer_dir: str | Path | None = None) -> None:
    """Save a TPA checkpoint: safetensors + config.json (with the TPA ranks) + the tokenizer files."""
    config = {
        "architectures": [TPA_ARCHITECTURE],
        "model_type": TPA_MODEL_TYPE,
        "format_version": 1,
        "text_config": model.config.to_dict(),
    }
    save_tpa_checkpoint(model, config, Path(out), Path(tokenizer_dir) if tokenizer_dir else None)


__all__ = ["load_model", "save_model", "ConversionReport"]
