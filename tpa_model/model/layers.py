"""The small building blocks of the decoders: RMSNorm, rotary embeddings, gated MLPs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: computed in float32, scaled by (1 + w), and only then cast back."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.float())).type_as(x)


def llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalized in float32, cast back, then scaled by w."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def embedding(count: int, dim: int) -> nn.Embedding:
    """nn.Embedding, initialized N(0, 1) as torch does, except on the meta device, where the loader builds a
    model to fill from a checkpoint: there torch's normal_ imports torch._dynamo, 2 s of every start-up."""
    weight = torch.empty(count, dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding.from_pretrained(weight, freeze=False)


class RMSNorm(nn.Module):
    """Gemma's norm (scale 1 + w, weights start at 0), or with unit_offset=False Llama's (scale w)."""

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = True):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unit_offset:
            return rms_norm(x, self.weight, self.eps)
        return llama_rms_norm(x, self.weight, self.eps)


class Rotary(nn.Module):
    """Rotate-half RoPE for one base frequency; linear scaling divides positions by `scaling`.

    The frequencies are recomputed per call (head_dim / 2 numbers) so they are always float32 and never
    stale after a model is moved between devices or dtypes.
    """

    def __init__(self, head_dim: int, theta: float, scaling: float = 1.0, llama3: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling, self.llama3 = head_dim, theta, scaling, llama3

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape positions.shape + [head_dim]."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=positions.device) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents) / self.scaling
        if self.llama3 is not None:
            inv_freq = llama3_frequencies(inv_freq, **self.llama3)
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def llama3_frequencies(
    inv_freq: torch.Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: float,
) -> torch.Tensor:
    """Llama 3's RoPE scaling: wavelengths longer than the original context / low_freq_factor are stretched by
    `factor`, shorter than context / high_freq_factor kept, and the band between interpolated smoothly."""
    wavelength = 2 * math.pi / inv_freq
    long_wave = original_max_position_embeddings / low_freq_factor
    short_wave = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelength > long_wave, inv_freq / factor, inv_freq)
    return torch.where((wavelength >= short_wave) & (wavelength <= long_wave), blended, out)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., seq, n, d] (n heads or ranks); cos/sin: [..., seq, d]."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): GeGLU (tanh GELU) for Gemma, SwiGLU (SiLU) for Llama."""

    def __init__(self, hidden: int, intermediate: int, activation: str = "gelu_tanh"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        gate = F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(gate * self.up_proj(x))
