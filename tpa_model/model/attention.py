"""Tensor Product Attention for Gemma 3.

Each token's keys (values, and optionally queries) for all heads are a sum of R outer products:

    K(x)[g] = sum_r a_r(x)[g] * b_r(x)       a_r(x) in R^G (head factor), b_r(x) in R^d (token factor)

with b_r(x) = RoPE((1 + w) * W_b^r x) and a_r(x)[g] = U[g, r] / rms_g(x). U (G x R) is a head basis, and
rms_g(x) is the RMS of head g's pre-norm key sum_r U[g, r] W_b^r x, so Gemma's per-head k_norm folds in
exactly. At R = G with U = I this is Gemma 3's attention to the last bit; at R < G it is the projection of
the stacked head keys onto span(U).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..cache.backends import attend
from .config import GEMMA3, TextConfig
from .layers import RMSNorm, apply_rope

if TYPE_CHECKING:
    from ..cache.metadata import AttentionMetadata


class FactorProjection(nn.Module):
    """x -> (head factors [..., R, n_heads], token factors [..., R, d]).

    The head factors are the basis U (one matrix for all tokens), or with `contextual` T6's form: U plus a
    linear function of the token, head_proj(x), which starts at zero so that a converted model begins where
    conversion left it and healing can make the head factors depend on the token. The cache stores head
    factors per token either way, so contextual ones cost no memory.
    """

    def __init__(self, hidden: int, n_heads: int, head_dim: int, rank: int, norm: bool, eps: float,
                 contextual: bool = False):
        super().__init__()
        self.n_heads, self.head_dim, self.rank, self.eps = n_heads, head_dim, rank, eps
        self.token_proj = nn.Linear(hidden, rank * head_dim, bias=False)
        # U: [n_heads, R], the identity's first columns (not torch.eye, which imports torch._dynamo on meta)
        self.head_basis = nn.Parameter(torch.zeros(n_heads, rank).fill_diagonal_(1.0))
        self.norm_weight = nn.Parameter(torch.zeros(head_dim)) if norm else None
        self.head_proj = None
        self.svd_rank: int | None = None  # per-token SVD: cache the best rank-R fit of each token's G x d keys
        if contextual:
            self.make_contextual()

    @property
    def cache_rank(self) -> int:
        """The rank of what the cache stores."""
        return self.svd_rank or self.rank

    def make_contextual(self) -> None:
        """Add the learned, token-dependent part of the head factors, at zero (nothing changes yet)."""
        weight = self.token_proj.weight
        self.head_proj = nn.Linear(weight.shape[1], self.rank * self.n_heads, bias=False,
                                   device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(self.head_proj.weight)

    def head_factors(self, x: torch.Tensor, batch_shape) -> torch.Tensor:
        """[..., R, n_heads] before the norm: U^T, plus head_proj(x) when contextual."""
        basis = self.head_basis.t()
        if self.head_proj is None:
            return basis.expand(*batch_shape, self.rank, self.n_heads)
        return basis + self.head_proj(x).unflatten(-1, (self.rank, self.n_heads))

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.token_proj(x).unflatten(-1, (self.rank, self.head_dim))  # pre-norm token factors
        A = self.head_factors(x, c.shape[:-2])
        if self.norm_weight is None:
            head, token = A.to(c.dtype), c
        else:
            # mean square of head g's pre-norm vector sum_r A[r, g] c_r, from the R x R Gram matrix of c
            cf, Af = c.float(), A.float()
            gram = cf @ cf.transpose(-1, -2)
            mean_sq = torch.einsum("...rg,...rs,...sg->...g", Af, gram, Af) / self.head_dim
            inv_rms = torch.rsqrt(mean_sq + self.eps)  # [..., n_heads]
            head = (Af * inv_rms.unsqueeze(-2)).to(c.dtype)
            token = (cf * (1.0 + self.norm_weight.float())).to(c.dtype)
        if self.svd_rank is not None:
            head, token = per_token_svd(head, token, self.svd_rank)
        if rope is not None:
            token = apply_rope(token, *rope)
        return head, token

    def cache_entries(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, ...]:
        """What the cache stores for these tokens: the factors below full rank, else the plain per-head
        vectors [..., n_heads, d] (at R = n_heads factors cost more than the vectors they describe)."""
        head, token = self(x, rope)
        if self.cache_rank < self.n_heads:
            return head, token
        return (combine(head, token),)

    def head_weights(self) -> torch.Tensor:
        """The per-head projection these factors represent, [n_heads, d, hidden] (norm excluded; contextual
        head factors have none, so conversion happens before they are added)."""
        if self.head_proj is not None:
            raise ValueError("contextual head factors depend on the token: there is no fixed per-head projection")
        W_b = self.token_proj.weight.unflatten(0, (self.rank, self.head_dim))
        return torch.einsum("gr,rdh->gdh", self.head_basis.to(W_b.dtype), W_b)


def per_token_svd(head: torch.Tensor, token: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-R factors of each token's own G x d key matrix (Eckart-Young): head factors are its
    left singular vectors, token factors the right ones times the singular values. RoPE, applied afterwards,
    rotates along d only, so the factored product stays exact for the truncated keys."""
    keys = combine(head, token).float()  # [..., G, d]
    U, S, Vh = torch.linalg.svd(keys, full_matrices=False)
    new_head = U[..., :, :rank].transpose(-1, -2)
    new_token = S[..., :rank, None] * Vh[..., :rank, :]
    return new_head.to(token.dtype), new_token.to(token.dtype)


def combine(head: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """sum_r head[..., r, g] * token[..., r, :] -> [..., n_heads, d]."""
    return torch.einsum("...rg,...rd->...gd", head, token)


class TPAttention(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        c = config
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = c.query_pre_attn_scalar**-0.5
        D, H, G, d, eps = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
        qk_norm = c.architecture == GEMMA3  # Llama has none: its head factors are the constant basis
        if c.tpa.q_rank is None:
            self.q_proj = nn.Linear(D, H * d, bias=False)
            self.q_norm = RMSNorm(d, eps) if qk_norm else None
            self.q = None
        else:
            self.q = FactorProjection(D, H, d, c.tpa.q_rank, norm=qk_norm, eps=eps)
        k_rank, v_rank = c.layer_ranks(layer)
        contextual, svd = c.tpa.contextual_heads, c.tpa.factorization == "svd"
        self.k = FactorProjection(D, G, d, G if svd else k_rank, norm=qk_norm, eps=eps, contextual=contextual)
        self.v = FactorProjection(D, G, d, G if svd else v_rank, norm=False, eps=eps, contextual=contextual)
        if svd:  # the weights stay exact; each token's keys and values are factored when cached
            self.k.svd_rank = k_rank if k_rank < G else None
            self.v.svd_rank = v_rank if v_rank < G else None
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def queries(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """[N, H, d]: queries are not cached, so they are materialized even when factored. Without rope:
        before RoPE (conversion measures them so)."""
        if self.q is None:
            q = self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim))
            q = q if self.q_norm is None else self.q_norm(q)
            return q if rope is None else apply_rope(q, *rope)
        return combine(*self.q(x, rope))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        """x: [N, D], the step's new tokens. Their keys and values go into the cache, then every query attends
        over its sequence's cached tokens."""
        q = self.queries(x, rope)
        k, v = self.k.cache_entries(x, rope), self.v.cache_entries(x)
        out = attend(self.layer, q, k, v, meta, self.scale)
        return self.o_proj(out.flatten(1))
