"""What the Triton kernels share: reading the paged cache, the online softmax step, dtypes and tile padding."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

NEG = tl.constexpr(-1e30)  # running-max floor: an empty tile or split then weighs exp(NEG - m) = 0, never NaN
MIN_DOT = 16  # tl.dot on a GPU needs every dimension >= 16: heads, tokens and head_dim are padded to it

@triton.jit
def online_softmax_step(m, l, s):
    """A tile of scores s [rows, keys] into the running max m and sum l [rows] of an online softmax. Returns
    (m, l, p, alpha): the new max and sum, the tile's unnormalized probabilities, and the factor that rescales
    what was accumulated before. A row with no visible key so far keeps m = NEG: p = 0, never NaN."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m - m_new)
    return m_new, l * alpha + tl.sum(p, axis=1), p, alpha


@triton.jit
def table_slots(table_ptr, seq, table_stride, t, tok_ok, BLOCK_SIZE: tl.constexpr):
    """The cache slot of each of a sequence's keys t (columns of its block table, from 0): block * size +
    offset, int64 as the table, so large caches never overflow."""
    block = tl.load(table_ptr + seq * table_stride + t // BLOCK_SIZE, mask=tok_ok, other=0)
    return block * BLOCK_SIZE + t % BLOCK_SIZE


@triton.jit
def token_rows(ptr, slots, tok_ok, dims, dim_ok, r, R: tl.constexpr, D: tl.constexpr):
    """[tokens, D]: the token factor of rank r of each token (d contiguous numbers per row)."""
    ptrs = ptr + slots[:, None] * (R * D) + r * D + dims[None, :]
    return tl.load(ptrs, mask=tok_ok[:, None] & dim_ok[None, :], other=0.0)


@triton.jit
def plain_rows(ptr, group, num_slots, slots, tok_ok, dims, dim_ok, D: tl.constexpr):
    """[tokens, D]: one kv group's plain keys (or values) of the tile; the part is stored [G, slots, d]."""
    ptrs = ptr + (group.to(tl.int64) * num_slots + slots[:, None]) * D + dims[None, :]
    return tl.load(ptrs, mask=tok_ok[:, None] & dim_ok[None, :], other=0.0)


def kernel_parts(kv) -> tuple:
    """(k0, k1, v0, v1, num_slots): a layer's storage as the kernels take it. A factored part is its (head,
    token) factors; a plain part [G, slots, d] is passed twice (the kernels read only the first)."""
    k0, k1 = kv.k if kv.spec.k_factored else (kv.k[0], kv.k[0])
    v0, v1 = kv.v if kv.spec.v_factored else (kv.v[0], kv.v[0])
    num_slots = kv.k[0].shape[0] if kv.spec.k_factored else kv.k[0].shape[1]
    return k0, k1, v0, v1, num_slots


TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_dtype(dtype: torch.dtype):
    """The operands' type in the kernels' products: the cache's (on a GPU, tensor cores multiply bf16/fp16
    exactly and accumulate in float32). Triton's interpreter computes in numpy, which has no bfloat16 (its
    bf16 arithmetic is wrong), so there bf16 operands are widened to float32 after rounding to bf16: the
    same products, the same float32 accumulation."""
    if dtype == torch.bfloat16 and interpreter_enabled():
        return tl.float32
    return TL_DTYPES[dtype]


def pad(n: int) -> int:
    """A power of two >= n and >= 16 (tl.arange needs a power of two, tl.dot at least 16)."""
    return max(MIN_DOT, triton.next_power_of_2(n))


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
