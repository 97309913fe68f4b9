"""Attention computed on TPA factors, its dense reference, and the Gemma 3 masks.

A token's keys are K[g] = sum_r a_k[r, g] * b_k[r]: head factors a_k (R_K x G, k_norm's 1/rms folded in)
and token factors b_k (R_K x d, RoPE applied). Values likewise with rank R_V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Factors:
    """Per-token K/V factors. Shapes: a_* [B, T, R, G] (head factors), b_* [B, T, R, d] (token factors)."""

    a_k: torch.Tensor
    b_k: torch.Tensor
    a_v: torch.Tensor
    b_v: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.a_k, self.b_k, self.a_v, self.b_v

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def select(self, index) -> Factors:
        """The same factors indexed along their leading dimensions (a gather through cache slots)."""
        return Factors(*(t[index] for t in self.tensors()))

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as [B, G, T, d]: only for prefill, where attention is compute-bound anyway."""
        k = torch.einsum("btrg,btrd->bgtd", self.a_k, self.b_k)
        v = torch.einsum("btrg,btrd->bgtd", self.a_v, self.b_v)
        return k, v


def factor_attention(q: torch.Tensor, kv: Factors, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention read straight from the factors, never building K or V.

    q: [B, H, L, d]; mask: bool [B or 1, 1, L, T], True where the key is visible. Returns [B, H, L, d].
        s[h, t] = scale * sum_r a_k[t, r, g(h)] * (q_h . b_k[t, r])
        o_h     = sum_{t, r} (p[h, t] * a_v[t, r, g(h)]) * b_v[t, r]
    Both sums are dense matrix products over the (t, r) pairs.
    """
    B, H, L, d = q.shape
    _, T, R_k, G = kv.a_k.shape
    R_v = kv.a_v.shape[2]
    M = (H // G) * L  # the queries that share one kv group's head factors
    qg = q.reshape(B, G, M, d)

    qb = torch.matmul(qg, kv.b_k.reshape(B, 1, T * R_k, d).transpose(-1, -2))  # [B, G, M, T*R_k]
    a_k = kv.a_k.permute(0, 3, 1, 2).unsqueeze(2)  # [B, G, 1, T, R_k]
    scores = (qb.view(B, G, M, T, R_k).float() * a_k.float()).sum(-1) * scale  # [B, G, M, T]
    scores = scores.view(B, H, L, T).masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1).view(B, G, M, T, 1)

    a_v = kv.a_v.permute(0, 3, 1, 2).unsqueeze(2)  # [B, G, 1, T, R_v]
    pa = (p * a_v.float()).to(q.dtype).reshape(B, G, M, T * R_v)
    out = torch.matmul(pa, kv.b_v.reshape(B, 1, T * R_v, d))  # [B, G, M, d]
    return out.view(B, H, L, d)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Standard GQA attention. q: [B, H, L, d]; k, v: [B, G, T, d]; mask as in factor_attention."""
    H, G = q.shape[1], k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=H != G)


def attend(q: torch.Tensor, kv: Factors, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Single-token decode is memory-bound: read the factors only. Prefill is compute-bound: materialize
    this chunk's K and V and use the fused dense kernel."""
    if q.shape[2] == 1:
        return factor_attention(q, kv, mask, scale)
    k, v = kv.materialize()
    return dense_attention(q, k, v, mask, scale)


def attention_masks(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, extra_visible: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(global mask, sliding-window mask), bool [B or 1, 1, L, T], True where key t is visible to query i.

    Global layers: causal (k_pos <= q_pos), OR-ed with extra_visible (images see all of their own tokens).
    Sliding layers: the same AND q_pos - k_pos < window.
    """
    diff = q_pos[:, None] - k_pos[None, :]
    visible = (diff >= 0)[None, None]
    if extra_visible is not None:
        visible = visible | extra_visible
    return visible, visible & (diff < window)


def image_block_mask(is_image: torch.Tensor, num_cached: int = 0) -> torch.Tensor:
    """Bool [B, 1, L, num_cached + L]: True between two tokens of the same image.

    is_image: bool [B, L] for the new tokens. Each contiguous run of image tokens is one image, so an image
    sees all of its own tokens (bidirectional) but never a later image's. Cached keys get no extra
    visibility: an image is always prefilled within one forward pass.
    """
    starts = is_image & ~F.pad(is_image, (1, 0), value=False)[:, :-1]
    block = torch.where(is_image, starts.long().cumsum(-1), 0)  # 0 = text, 1.. = image number
    same = (block[:, :, None] == block[:, None, :]) & is_image[:, :, None]
    return F.pad(same, (num_cached, 0), value=False).unsqueeze(1)
