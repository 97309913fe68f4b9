"""Reading Hugging Face Gemma 3 checkpoints and our own TPA checkpoints; writing TPA checkpoints.

Tensors are streamed one at a time from safetensors files into a model built on the meta device, so a
checkpoint never sits in memory twice. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model.config import HF_ARCHITECTURES, TPA_ARCHITECTURE, ConfigError, TextConfig, text_config_from_hf

TPA_MODEL_TYPE = "gemma3_tpa"
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)
# Where the language model lives in each Hugging Face key layout, most specific first.
LM_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "language_model.", "")


class CheckpointError(ValueError):
    """A checkpoint we cannot load; the message names the file and the tensor."""


def read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Gemma 3 or TPA checkpoint directory)")
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (a checkpoint directory needs config.json)")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON: {e}") from e


def is_tpa_checkpoint(config: dict[str, Any]) -> bool:
    return config.get("model_type") == TPA_MODEL_TYPE


def parse_text_config(path: Path, config: dict[str, Any], source: Path | None = None) -> TextConfig:
    """The text config of either checkpoint kind, with errors that name config.json."""
    try:
        if is_tpa_checkpoint(config):
            return TextConfig.from_dict(config["text_config"])
        architectures = set(config.get("architectures") or [])
        if architectures and not architectures & HF_ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture {sorted(architectures)}; expected one of {sorted(HF_ARCHITECTURES)} "
                f"or {TPA_ARCHITECTURE}"
            )
        return text_config_from_hf(config)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source or path / 'config.json'}: {e}") from e


class TensorFiles:
    """Lazy, read-only access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, path: Path):
        self.path = path
        self.file_of: dict[str, Path] = {}
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index: {e}") from e
            for name, file in weight_map.items():
                self.file_of[name] = path / file
            for file in sorted(set(self.file_of.values())):
                if not file.is_file():
                    raise CheckpointError(f"{file}: missing (listed in {index.name})")
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                found = ", ".join(p.name for p in path.glob("*.bin")) or "none"
                raise CheckpointError(
                    f"{path}: no .safetensors files (only safetensors checkpoints are loaded; .bin files: {found})"
                )
            for file in files:
                for name in self._open(file).keys():
                    self.file_of[name] = file

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            except Exception as e:  # safetensors raises its own error types for bad headers and short files
                raise CheckpointError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from e
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        file = self.file_of[name]
        handle = self._open(file)
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: tensor '{name}' cannot be read (truncated or corrupt?): {e}") from e

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()


def find_prefix(keys: Iterable[str], prefixes: Iterable[str], probe: str) -> str | None:
    """The first prefix under which `probe` names a tensor of the checkpoint."""
    names = set(keys)
    return next((p for p in prefixes if p + probe in names), None)


def hf_language_prefix(keys: Iterable[str]) -> str:
    prefix = find_prefix(keys, LM_PREFIXES, "embed_tokens.weight")
    if prefix is None:
        looked = ", ".join(repr(p + "embed_tokens.weight") for p in LM_PREFIXES)
        raise CheckpointError(f"no language model embeddings found (looked for {looked})")
    return prefix


def hf_name(our_name: str, lm_prefix: str) -> str | None:
    """The Hugging Face tensor name for one of our text-model parameters (None: not in HF checkpoints)."""
    if our_name == "lm_head.weight":
        return "lm_head.weight"
    replacements = {
        ".attn.q_proj.": ".self_attn.q_proj.",
        ".attn.q_norm.": ".self_attn.q_norm.",
        ".attn.k.token_proj.weight": ".self_attn.k_proj.weight",
        ".attn.k.norm_weight": ".self_attn.k_norm.weight",
        ".attn.v.token_proj.weight": ".self_attn.v_proj.weight",
        ".attn.o_proj.": ".self_attn.o_proj.",
    }
    if our_name.endswith("head_basis"):
        return None
    name = our_name
    for ours, theirs in replacements.items():
        name = name.replace(ours, theirs)
    return lm_prefix + name


def load_weights(model: torch.nn.Module, files: TensorFiles, name_map: dict[str, str | None], dtype, device) -> None:
    """Fill every parameter of a meta-device model from the checkpoint, one tensor at a time."""
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    for ours, param in params.items():
        theirs = name_map[ours]
        if theirs is None:  # head bases of an exact conversion: the identity
            with torch.no_grad():
                param.copy_(torch.eye(*param.shape, dtype=dtype))
            continue
        if theirs not in files.file_of:
            raise CheckpointError(f"{files.path}: missing tensor '{theirs}' (needed for {ours})")
        tensor = files.get(theirs)
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{files.file_of[theirs]}: tensor '{theirs}' has shape {list(tensor.shape)}, "
                f"but the config needs {list(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(tensor.to(dtype))


def save_tpa_checkpoint(
    model: torch.nn.Module,
    config_dict: dict[str, Any],
    out: Path,
    tokenizer_dir: Path | None = None,
    max_shard_bytes: int = 4 << 30,
) -> None:
    """Write safetensors shards + config.json + the tokenizer files: loadable without the source model."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        size += nbytes
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        index = {"metadata": {}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer_dir is not None and tokenizer_dir.resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, out / name)

