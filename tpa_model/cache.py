"""The factor cache: what attention layers write each token's K/V factors into and read them back from.

Only factors are stored: R_K (G + d) + R_V (G + d) numbers per token and layer, against 2 G d for a
standard Gemma cache.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .attention import Factors, attend
from .config import TextConfig


class FactorCache(Protocol):
    seq_len: int

    def attend(self, layer: int, q: torch.Tensor, new: Factors, mask: torch.Tensor, scale: float) -> torch.Tensor:
        """Store the new tokens' factors and attend q [B, H, L, d] over every cached token."""
        ...

    def advance(self, n: int) -> None:
        """Called by the model after all layers have stored n new tokens."""
        ...


class ContiguousFactorCache:
    """One preallocated slab per layer for a batch of sequences that advance together."""

    def __init__(
        self,
        config: TextConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.max_len = max_len
        self.seq_len = 0
        self.layers = [
            Factors(*(torch.zeros(batch_size, max_len, r, w, dtype=dtype, device=device)
                      for r, w in config.factor_shapes()))
            for _ in range(config.num_hidden_layers)
        ]

    def update(self, layer: int, new: Factors) -> Factors:
        start, end = self.seq_len, self.seq_len + new.a_k.shape[1]
        if end > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; cannot store up to position {end}")
        slabs = self.layers[layer]
        for buf, t in zip(slabs.tensors(), new.tensors()):
            buf[:, start:end] = t
        return Factors(*(buf[:, :end] for buf in slabs.tensors()))

    def attend(self, layer: int, q: torch.Tensor, new: Factors, mask: torch.Tensor, scale: float) -> torch.Tensor:
        return attend(q, self.update(layer, new), mask, scale)

    def advance(self, n: int) -> None:
        self.seq_len += n

    def bytes_per_token(self, layer: int) -> int:
        """Measured from the allocated tensors: bytes one token occupies in one layer, per sequence."""
        slabs = self.layers[layer]
        batch, max_len = slabs.a_k.shape[:2]
        return slabs.nbytes // (batch * max_len)
