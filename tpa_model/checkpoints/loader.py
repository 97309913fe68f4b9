"""load_model / save_model: the one entry point from a checkpoint on disk to a ready model.

A checkpoint is a Hugging Face directory (safetensors), a TPA checkpoint directory, or a GGUF file, which
is read as the Hugging Face checkpoint it was converted from (tpa_model/checkpoints/gguf.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..compression.convert import ConversionReport, RankSpec, reduce_rank
from ..model.config import TPA_ARCHITECTURE, TextConfig
from ..model.decoder import GemmaTPAModel
from ..model.vision import VisionConfig, hf_projector_prefix, hf_vision_prefix
from . import provenance
from .safetensors_files import (
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

IMAGE_TOKEN_DEFAULT = 262_144  # <image_soft_token> in the Gemma 3 vocabulary


def _vision_parts(raw: dict, keys: list[str]) -> tuple[VisionConfig | None, int | None]:
    """The vision config and image token id of a checkpoint, or (None, None) for a text-only one."""
    if is_tpa_checkpoint(raw):
        if not raw.get("vision_config"):
            return None, None
        return VisionConfig.from_dict(raw["vision_config"]), int(raw["image_token_index"])
    if raw.get("model_type") != "gemma3" or hf_vision_prefix(keys) is None:
        return None, None
    return VisionConfig.from_hf(raw), int(raw.get("image_token_index", IMAGE_TOKEN_DEFAULT))


def _hf_name_map(names: list[str], keys: list[str]) -> dict[str, str | None]:
    lm_prefix = hf_language_prefix(keys)
    name_map: dict[str, str | None] = {}
    for name in names:
        if name.startswith("vision_tower."):
            name_map[name] = hf_vision_prefix(keys) + name.removeprefix("vision_tower.")
        elif name.startswith("multi_modal_projector."):
            name_map[name] = hf_projector_prefix(keys) + name.removeprefix("multi_modal_projector.")
        else:
            name_map[name] = hf_name(name, lm_prefix)
    return name_map


def open_checkpoint(path: Path) -> tuple[dict, TextConfig, TensorFiles]:
    """(raw config, text config, tensor reader) of a checkpoint directory or a .gguf file."""
    if path.suffix == ".gguf":
        from .gguf import GGUFTensors

        files = GGUFTensors(path)
        return files.config, parse_text_config(path, files.config, source=path), files
    raw = read_config(path)
    return raw, parse_text_config(path, raw), TensorFiles(path)


def load_model(
    path: str | Path,
    *,
    k_rank: RankSpec = None,
    v_rank: RankSpec = None,
    q_rank: RankSpec = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> GemmaTPAModel:
    """Load a Hugging Face Gemma 3 or Llama directory or GGUF file (converted on load), or a TPA checkpoint
    saved by tpa-convert.

    Ranks left as None keep the checkpoint's own (exact for Hugging Face checkpoints); lower ranks are
    reached by weight-space conversion. The conversion report is kept on `model.conversion_report`.
    """
    path = Path(path)
    raw, config, files = open_checkpoint(path)
    try:
        try:
            vision, image_token_id = _vision_parts(raw, files.keys())
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path / 'config.json'}: bad vision config: {e}") from e
        with torch.device("meta"):
            model = GemmaTPAModel(config, vision, image_token_id).to(dtype)
        names = [n for n, _ in model.named_parameters()]
        if is_tpa_checkpoint(raw):
            name_map = {n: n for n in names}
        else:
            name_map = _hf_name_map(names, files.keys())
        load_weights(model, files, name_map, dtype, device)
    finally:
        files.close()
    model.eval()
    model.source_path = path
    model.provenance = dict(raw.get(provenance.KEY) or {}) if is_tpa_checkpoint(raw) else {}
    model.conversion_report = None
    if any(r is not None for r in (k_rank, v_rank, q_rank)):
        try:
            model.conversion_report = reduce_rank(model, k_rank, v_rank, q_rank, progress=False)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
    return model


def save_model(
    model: GemmaTPAModel, out: str | Path, tokenizer_dir: str | Path | None = None, tokenizer=None
) -> None:
    """Save a TPA checkpoint: safetensors + config.json (with the TPA ranks) + the tokenizer: its files copied
    from tokenizer_dir when that is a checkpoint directory, else written by `tokenizer.save` (GGUF sources)."""
    config = {
        "architectures": [TPA_ARCHITECTURE],
        "model_type": TPA_MODEL_TYPE,
        "format_version": 1,
        "text_config": model.config.to_dict(),
    }
    if model.vision_config is not None:
        config["vision_config"] = model.vision_config.to_dict()
        config["image_token_index"] = model.image_token_id
    if getattr(model, "provenance", None):
        config[provenance.KEY] = model.provenance
    source = Path(tokenizer_dir) if tokenizer_dir and Path(tokenizer_dir).is_dir() else None
    save_tpa_checkpoint(model, config, Path(out), source)
    if source is None and tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(Path(out))


__all__ = ["load_model", "save_model", "ConversionReport"]
