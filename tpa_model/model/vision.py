"""Gemma 3's image encoder: the SigLIP vision tower and the projector that turns patches into soft tokens.

Parameter names follow the Hugging Face checkpoints (`vision_tower.vision_model.*` and
`multi_modal_projector.*`), so loading weights is a prefix strip; see `hf_vision_prefix`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.safetensors_files import find_prefix
from .config import ConfigError
from .layers import RMSNorm, embedding

# Activations the SigLIP tower of Gemma 3 may name; all mean gelu with the tanh approximation.
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")


@dataclass
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 896
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    mm_tokens_per_image: int = 256

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision hidden_size ({self.hidden_size}) is not a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size ({self.image_size}) is not a multiple of patch_size ({self.patch_size})")
        side = math.isqrt(self.mm_tokens_per_image)
        if side * side != self.mm_tokens_per_image:
            raise ConfigError(f"mm_tokens_per_image ({self.mm_tokens_per_image}) is not a square number")
        if self.patches_per_side % side:
            raise ConfigError(
                f"the {self.patches_per_side}x{self.patches_per_side} patch grid cannot be average-pooled "
                f"to {side}x{side} tokens"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.mm_tokens_per_image)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> VisionConfig:
        """Parse a Hugging Face Gemma 3 config.json; fields the sparse Hub configs omit get Gemma 3 defaults."""
        model_type = config.get("model_type")
        if model_type != "gemma3":
            raise ConfigError(f"model_type {model_type!r} has no vision tower (expected 'gemma3')")
        vision = dict(config.get("vision_config") or {})
        if vision.get("model_type", "siglip_vision_model") != "siglip_vision_model":
            raise ConfigError(f"vision model_type {vision['model_type']!r} is not supported (expected SigLIP)")
        # vision_use_head: some configs declare SigLIP's pooling head; Gemma 3 never runs it (it reads the
        # last hidden states), so its weights are left unread, as transformers leaves them unused.
        if vision.get("hidden_act", "gelu_pytorch_tanh") not in _GELU_TANH:
            raise ConfigError(f"vision hidden_act {vision['hidden_act']!r} is not supported")
        defaults = cls()

        def get(name: str, source: dict[str, Any]) -> Any:
            value = source.get(name)
            return getattr(defaults, name) if value is None else value

        return cls(
            hidden_size=int(get("hidden_size", vision)),
            intermediate_size=int(get("intermediate_size", vision)),
            num_hidden_layers=int(get("num_hidden_layers", vision)),
            num_attention_heads=int(get("num_attention_heads", vision)),
            num_channels=int(get("num_channels", vision)),
            image_size=int(get("image_size", vision)),
            patch_size=int(get("patch_size", vision)),
            layer_norm_eps=float(get("layer_norm_eps", vision)),
            mm_tokens_per_image=int(get("mm_tokens_per_image", config)),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class VisionEmbeddings(nn.Module):
    """Non-overlapping patches, linearly embedded, plus one learned position vector per patch."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [N, D, side, side]
        x = x.flatten(2).transpose(1, 2)  # [N, P, D], patches in row-major order
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    """Full bidirectional multi-head attention: every patch sees every patch, no mask."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p, d = x.shape
        q, k, v = (proj(x).view(n, p, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)  # [N, H, P, hd]
        return self.out_proj(out.transpose(1, 2).reshape(n, p, d))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class VisionTower(nn.Module):
    """SigLIP encoder as Gemma 3 uses it: last hidden state after `post_layernorm`, no pooling head."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C, S, S] with S = image_size -> patch features [N, num_patches, hidden]."""
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must have shape [N, {', '.join(map(str, expected))}], "
                             f"got {list(pixel_values.shape)}")
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


class MultiModalProjector(nn.Module):
    """Average-pool the patch grid to mm_tokens_per_image soft tokens, RMS-normalise, project to text width."""

    def __init__(self, vision_config: VisionConfig, text_hidden_size: int):
        super().__init__()
        self.patches_per_side = vision_config.patches_per_side
        self.kernel = vision_config.patches_per_side // vision_config.tokens_per_side
        self.mm_soft_emb_norm = RMSNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        # Stored [vision_hidden, text_hidden] as in the checkpoints, and used as x @ W (no transpose).
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(vision_config.hidden_size, text_hidden_size))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [N, num_patches, vision_hidden] -> soft tokens [N, mm_tokens_per_image, text_hidden]."""
        n, p, d = patches.shape
        side = self.patches_per_side
        grid = patches.transpose(1, 2).reshape(n, d, side, side)  # patch i sits at row i // side, col i % side
        pooled = F.avg_pool2d(grid, kernel_size=self.kernel, stride=self.kernel)
        tokens = pooled.flatten(2).transpose(1, 2)  # [N, tokens, D], row-major again
        out = self.mm_soft_emb_norm(tokens) @ self.mm_input_projection_weight
        return out.type_as(patches)


# Where the weights live in Hugging Face Gemma 3 checkpoints: Hub files and transformers < 4.52 use the
# top-level names, later versions nest them under `model.`; some exports drop the `vision_model` level.
_VISION_PREFIXES = (
    "vision_tower.vision_model.",
    "model.vision_tower.vision_model.",
    "vision_tower.",
    "model.vision_tower.",
)
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


def hf_vision_prefix(keys: Iterable[str]) -> str | None:
    """The prefix to strip from checkpoint tensor names to get VisionTower names; None if there is no tower."""
    return find_prefix(keys, _VISION_PREFIXES, "embeddings.patch_embedding.weight")


def hf_projector_prefix(keys: Iterable[str]) -> str | None:
    """The prefix to strip to get MultiModalProjector names; None if there is no projector."""
    return find_prefix(keys, _PROJECTOR_PREFIXES, "mm_input_projection_weight")
