"""GGUF files (llama.cpp's format) presented as Hugging Face checkpoints.

`gguf_config(path)` turns a file's metadata into a config.json dict, and `GGUFTensors(path)` has the interface
of `checkpoint.TensorFiles`: tensors under their Hugging Face names, each dequantized to float32 only when
asked for, so the loader streams a GGUF file one tensor at a time as it does safetensors shards. Parsing and
dequantization is `gguf_quants`' (the IQ-family formats the `gguf` package's, by llama.cpp's authors), the header
is read by `gguf_reader`; the file is memory-mapped, never read whole.

What llama.cpp's converter did to the weights is undone here:
- Gemma 3 RMSNorm weights are stored as w + 1 (Hugging Face keeps w and multiplies by 1 + w): 1 is subtracted.
- Llama-architecture Q and K projections have each head's rows permuted so that the two rotary halves are
  interleaved (llama.cpp's rotation pairs adjacent dimensions): the permutation is inverted.
- Llama 3 RoPE scaling is baked into a `rope_freqs` tensor of per-frequency divisors: the config's
  `rope_scaling` is recovered from it.
- Dimensions: GGUF lists them fastest-varying first; torch order is the reverse.
Hyperparameters llama.cpp hard-codes for Gemma 3 instead of storing (every 6th layer global, local RoPE base
10000, query scale) are filled in the same way llama.cpp fills them.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.config import GLOBAL, SLIDING, default_layer_types
from ..model.layers import llama3_frequencies
from .gguf_quants import dequantize
from .gguf_reader import GGUFFile, GGUFFormatError, GGUFTensorInfo
from .safetensors_files import CheckpointError

SUPPORTED_ARCHITECTURES = ("gemma3", "llama")

# llama.cpp tensor names -> Hugging Face names. Per-layer names are `blk.N.<name>.weight|bias`.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_LAYER_NAMES_BY_ARCH = {
    # Gemma 3's four sandwich norms: llama.cpp's FFN_PRE_NORM is written as `ffn_norm`.
    "gemma3": {
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    # Llama's norm before the MLP, which Hugging Face calls post_attention_layernorm.
    "llama": {"ffn_norm": "post_attention_layernorm"},
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)")
# Llama 3's per-frequency RoPE divisors: read into the config, not a Hugging Face tensor.
_ROPE_FREQS = "rope_freqs.weight"

GEMMA3_SLIDING_WINDOW_PATTERN = 6  # llama.cpp: hparams.set_swa_pattern(6) for LLM_ARCH_GEMMA3
GEMMA3_LOCAL_ROPE_BASE = 10_000.0  # llama.cpp: rope_freq_base_train_swa for LLM_ARCH_GEMMA3
GEMMA3_27B_LAYERS = 62  # llama.cpp scales 27B queries by 1/sqrt(hidden / heads), other sizes by 1/sqrt(head_dim)


def _open(path: Path) -> GGUFFile:
    """The file's header, parsed once per process (the model and its tokenizer both need it); the file is
    memory-mapped, so keeping it costs no memory."""
    if not path.exists():
        raise CheckpointError(f"{path}: missing (expected a GGUF file)")
    stat = path.stat()
    return _open_uncached(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _open_uncached(path: Path, mtime_ns: int, size: int) -> GGUFFile:
    if not path.exists():
        raise CheckpointError(f"{path}: missing (expected a GGUF file)")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file (expected a GGUF file)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return GGUFFile(path)
    except GGUFFormatError as e:
        raise CheckpointError(f"{path}: cannot read GGUF file (truncated or corrupt?): {e}") from e
    except (ValueError, OSError) as e:  # an empty file cannot be mapped; a name is not UTF-8 (UnicodeDecodeError)
        raise CheckpointError(f"{path}: cannot read GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from e


class _Metadata:
    """Typed access to one file's metadata, with errors that name the file and the key."""

    def __init__(self, path: Path, reader: GGUFFile):
        self.path = path
        self.fields = reader.fields
        self.tensors = {t.name: t for t in reader.tensors}
        architecture = self.fields.get("general.architecture")
        if architecture is None:
            raise CheckpointError(f"{path}: no general.architecture in the GGUF metadata")
        self.architecture = str(architecture)
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{path}: GGUF architecture {self.architecture!r} is not supported "
                f"(expected one of {list(SUPPORTED_ARCHITECTURES)})"
            )

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def arch(self, key: str, default: Any = None, required: bool = False) -> Any:
        """`{architecture}.{key}`."""
        full = f"{self.architecture}.{key}"
        if required and full not in self.fields:
            raise CheckpointError(f"{self.path}: GGUF metadata key {full!r} is missing")
        return self.get(full, default)

    def vocab_size(self) -> int:
        size = self.arch("vocab_size")
        if size is not None:
            return int(size)
        tokens = self.fields.get("tokenizer.ggml.tokens")
        if tokens is not None:
            return len(tokens)
        if "token_embd.weight" in self.tensors:
            return int(self.tensors["token_embd.weight"].shape[-1])
        raise CheckpointError(f"{self.path}: cannot tell the vocabulary size (no vocab_size, token list or token_embd)")

    def special_tokens(self) -> dict[str, Any]:
        """bos/eos/pad ids; llama.cpp's end-of-turn and end-of-message ids join eos, as generation stops there."""
        eos = [self.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        eos = list(dict.fromkeys(int(e) for e in eos if e is not None))
        out = {
            "bos_token_id": self.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.get("tokenizer.ggml.padding_token_id"),
        }
        return out

    def rope_scaling_from_keys(self) -> dict[str, Any] | None:
        """`{arch}.rope.scaling.*` (llama.cpp writes linear and YaRN scaling this way)."""
        kind = self.arch("rope.scaling.type")
        if kind in (None, "none"):
            return None
        scaling: dict[str, Any] = {"rope_type": str(kind), "factor": float(self.arch("rope.scaling.factor", 1.0))}
        original = self.arch("rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling


def _gemma3_config(meta: _Metadata) -> dict[str, Any]:
    hidden = int(meta.arch("embedding_length", required=True))
    heads = int(meta.arch("attention.head_count", required=True))
    layers = int(meta.arch("block_count", required=True))
    head_dim = int(meta.arch("attention.key_length", hidden // heads))
    window = int(meta.arch("attention.sliding_window", 0) or 0)
    pattern = meta.arch("attention.sliding_window_pattern")
    if not window:  # llama.cpp: no window, no sliding layers
        layer_types = [GLOBAL] * layers
    elif isinstance(pattern, list):  # one flag per layer, true = sliding
        if len(pattern) != layers:
            raise CheckpointError(
                f"{meta.path}: {meta.architecture}.attention.sliding_window_pattern has {len(pattern)} entries "
                f"for {layers} layers"
            )
        layer_types = [SLIDING if p else GLOBAL for p in pattern]
    else:  # every n-th layer global; llama.cpp: 0 = all sliding, 1 = none
        n = GEMMA3_SLIDING_WINDOW_PATTERN if pattern is None else int(pattern)
        layer_types = [SLIDING] * layers if n == 0 else default_layer_types(layers, n)
    config: dict[str, Any] = {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": meta.vocab_size(),
        "hidden_size": hidden,
        "intermediate_size": int(meta.arch("feed_forward_length", required=True)),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.arch("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "query_pre_attn_scalar": hidden // heads if layers == GEMMA3_27B_LAYERS else head_dim,
        "rms_norm_eps": float(meta.arch("attention.layer_norm_rms_epsilon", 1e-6)),
        "sliding_window": window or None,
        "layer_types": layer_types,
        "rope_theta": float(meta.arch("rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": float(meta.arch("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE)),
        "max_position_embeddings": int(meta.arch("context_length", required=True)),
        "final_logit_softcapping": float(meta.arch("final_logit_softcapping", 0.0)) or None,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": "output.weight" not in meta.tensors,
        **meta.special_tokens(),
    }
    scaling = meta.rope_scaling_from_keys()
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _llama_config(meta: _Metadata, rope_freqs: Callable[[], np.ndarray]) -> dict[str, Any]:
    hidden = int(meta.arch("embedding_length", required=True))
    heads = int(meta.arch("attention.head_count", required=True))
    head_dim = int(meta.arch("attention.key_length", 0) or meta.arch("rope.dimension_count", 0) or hidden // heads)
    rotary = int(meta.arch("rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise CheckpointError(f"{meta.path}: partial rotary embeddings ({rotary} of {head_dim} dims) are not supported")
    theta = float(meta.arch("rope.freq_base", 10_000.0))
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": meta.vocab_size(),
        "hidden_size": hidden,
        "intermediate_size": int(meta.arch("feed_forward_length", required=True)),
        "num_hidden_layers": int(meta.arch("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.arch("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta.arch("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "max_position_embeddings": int(meta.arch("context_length", required=True)),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in meta.tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in meta.tensors,
        "tie_word_embeddings": "output.weight" not in meta.tensors,
        **meta.special_tokens(),
    }
    scaling = meta.rope_scaling_from_keys()
    if _ROPE_FREQS in meta.tensors:
        if scaling is not None:
            raise CheckpointError(f"{meta.path}: both rope.scaling keys and a {_ROPE_FREQS} tensor; ambiguous RoPE")
        scaling = _llama3_scaling(meta.path, rope_freqs(), theta, head_dim)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _llama3_scaling(path: Path, divisors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any] | None:
    """Llama 3 RoPE parameters from llama.cpp's rope_freqs tensor, the divisor of each base frequency.

    The divisor is 1 for short wavelengths, `factor` for long ones, and 1 / ((1 - s) / factor + s) between, with
    s = original_max_position_embeddings / (high - low) / wavelength - low / (high - low). The band is linear in
    1 / wavelength, so it fixes two numbers; low_freq_factor = 1 picks the one triple that gives them (the
    frequencies depend on nothing else). The result is checked by recomputing every divisor.
    """
    divisors = np.asarray(divisors, dtype=np.float64).reshape(-1)
    if divisors.shape[0] != head_dim // 2:
        raise CheckpointError(f"{path}: {_ROPE_FREQS} has {divisors.shape[0]} entries, expected {head_dim // 2}")
    factor = float(divisors.max())
    if np.allclose(divisors, 1.0, rtol=0, atol=1e-6):
        return None
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    band = (divisors > 1 + 1e-5) & (divisors < factor * (1 - 1e-5))
    if band.sum() < 2:
        raise CheckpointError(
            f"{path}: {_ROPE_FREQS} has fewer than two interpolated frequencies; cannot recover Llama 3 RoPE scaling"
        )
    smooth = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)
    inverse_wavelength = inv_freq[band] / (2 * math.pi)
    (a, b), *_ = np.linalg.lstsq(np.stack([inverse_wavelength, -np.ones_like(smooth)], axis=1), smooth, rcond=None)
    exact = {
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 1 + 1 / b,
        "original_max_position_embeddings": a / b,
    }
    rounded = {
        "factor": round(factor, 4),
        "low_freq_factor": 1.0,
        "high_freq_factor": round(1 + 1 / b, 4),
        "original_max_position_embeddings": round(a / b),
    }
    base = torch.from_numpy(inv_freq)
    for params in (rounded, exact):
        recomputed = (base / llama3_frequencies(base, **params)).numpy()
        if np.allclose(recomputed, divisors, rtol=1e-4, atol=0):
            return {"rope_type": "llama3", **params}
    raise CheckpointError(f"{path}: {_ROPE_FREQS} does not follow Llama 3 RoPE scaling; cannot express it in a config")


def _config(meta: _Metadata, rope_freqs: Callable[[], np.ndarray]) -> dict[str, Any]:
    try:
        if meta.architecture == "gemma3":
            return _gemma3_config(meta)
        return _llama_config(meta, rope_freqs)
    except CheckpointError:  # a ValueError, already naming the file
        raise
    except (TypeError, ValueError, ZeroDivisionError) as e:  # a value of the wrong type or a zero head count
        raise CheckpointError(f"{meta.path}: bad {meta.architecture} metadata: {type(e).__name__}: {e}") from e


def _hf_name(gguf_name: str, architecture: str) -> str | None:
    """The Hugging Face name of one llama.cpp tensor (None: no counterpart)."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if match is None:
        return None
    layer, part, suffix = match.groups()
    hf_part = _LAYER_NAMES_BY_ARCH[architecture].get(part) or _LAYER_NAMES.get(part)
    return None if hf_part is None else f"model.layers.{layer}.{hf_part}.{suffix}"


def _unpermute_rotary(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: within a head, rows (i, half) -> (half, i)."""
    rows = t.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of rotary pairs")
    return t.reshape(n_heads, rows // n_heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()


def _dequantize(path: Path, tensor: GGUFTensorInfo, hf_name: str) -> torch.Tensor:
    kind = tensor.tensor_type
    try:
        return dequantize(tensor.data, kind)
    except NotImplementedError as e:
        raise CheckpointError(f"{path}: tensor '{tensor.name}' ({hf_name}) has type {kind.name}, {e}") from e
    except Exception as e:
        raise CheckpointError(
            f"{path}: tensor '{tensor.name}' ({hf_name}, {kind.name}) cannot be dequantized (corrupt?): {e}"
        ) from e


def _rope_freqs(path: Path, reader: GGUFFile) -> np.ndarray:
    tensor = next(t for t in reader.tensors if t.name == _ROPE_FREQS)
    return _dequantize(path, tensor, "rope_scaling").numpy()


class GGUFTensors:
    """Lazy, read-only access to the tensors of a GGUF file under their Hugging Face names (float32).

    The same interface as `checkpoint.TensorFiles`: `path` (the .gguf file), `file_of` (every name -> the file),
    `keys()`, `get(name)` and `close()`. `config` is the file's config.json dict, as `gguf_config` gives it,
    without parsing the metadata twice. `lm_head.weight` is present only when the file has an output matrix.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader: GGUFFile | None = _open(self.path)
        meta = _Metadata(self.path, self._reader)
        self.architecture = meta.architecture
        self.config = _config(meta, lambda: _rope_freqs(self.path, self._reader))
        self._tensors: dict[str, GGUFTensorInfo] = {}
        self._transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        for tensor in self._reader.tensors:
            if tensor.name == _ROPE_FREQS and self.architecture == "llama":
                continue  # in the config as rope_scaling
            name = _hf_name(tensor.name, self.architecture)
            if name is None:
                raise CheckpointError(
                    f"{self.path}: tensor '{tensor.name}' has no Hugging Face counterpart in a "
                    f"{self.architecture} model"
                )
            self._tensors[name] = tensor
            transform = self._transform_for(tensor.name)
            if transform is not None:
                self._transforms[name] = transform
        self.file_of: dict[str, Path] = dict.fromkeys(self._tensors, self.path)

    def _transform_for(self, gguf_name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.architecture == "gemma3" and gguf_name.endswith("norm.weight"):
            return lambda t: t - 1.0  # llama.cpp stores Gemma's (1 + w) factor
        if self.architecture == "llama":
            if re.search(r"\.attn_q\.(weight|bias)$", gguf_name):
                heads = int(self.config["num_attention_heads"])
                return lambda t: _unpermute_rotary(t, heads)
            if re.search(r"\.attn_k\.(weight|bias)$", gguf_name):
                heads = int(self.config["num_key_value_heads"])
                return lambda t: _unpermute_rotary(t, heads)
        return None

    def _require_open(self) -> GGUFFile:
        if self._reader is None:
            raise CheckpointError(f"{self.path}: GGUF file already closed")
        return self._reader

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        self._require_open()
        if name not in self._tensors:
            raise KeyError(name)
        tensor = _dequantize(self.path, self._tensors[name], name)
        transform = self._transforms.get(name)
        if transform is None:
            return tensor
        try:
            return transform(tensor)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: tensor '{self._tensors[name].name}' ({name}): {e}") from e

    def close(self) -> None:
        """Drop the memory map (the reader holds the only reference to it)."""
        self._reader = None
        self._tensors.clear()
        self._transforms.clear()

    def __enter__(self) -> GGUFTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gguf_config(path: str | Path) -> dict[str, Any]:
    """A Hugging Face config.json dict from a GGUF file's metadata (gemma3 or llama architecture)."""
    path = Path(path)
    reader = _open(path)
    return _config(_Metadata(path, reader), lambda: _rope_freqs(path, reader))


def open_gguf(path: str | Path) -> GGUFFile:
    """A GGUF file's header (shared by everything that reads the same file); CheckpointError if unreadable."""
    return _open(Path(path))


def is_gguf_file(path: str | Path) -> bool:
    """Whether `path` is a file that starts with the GGUF magic bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


__all__ = ["GGUFTensors", "SUPPORTED_ARCHITECTURES", "gguf_config", "is_gguf_file"]
