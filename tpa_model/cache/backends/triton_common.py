"""What the Triton kernels share: reading the paged cache, the online softmax step, dtypes and tile padding."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..quantization import num_groups

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


# How a part is stored (quantization.py), as the kernels' constexpr codes
AUTO, INT8, FP8, INT4 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
QUANT_CODES = {"auto": 0, "int8": 1, "fp8_e4m3": 2, "int4": 3}


@triton.jit
def operand(x, MODEL_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """x rounded to the model's dtype, as a product's operand (in DOT_DTYPE, see dot_dtype): what the reference
    backend's casts do. The interpreter's float32 -> bfloat16 cast truncates, so where bf16 operands are
    widened to float32 (the interpreter) the rounding to nearest even is done on the bits."""
    if MODEL_DTYPE == tl.bfloat16 and DOT_DTYPE == tl.float32:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # 0xFFFF0000: the bf16 bits of a float32
        return bits.to(tl.float32, bitcast=True)
    return x.to(MODEL_DTYPE).to(DOT_DTYPE)


@triton.jit
def load_rows(ptr, scale_ptr, rows, row_ok, dims, dim_ok, D: tl.constexpr, D_PAD: tl.constexpr,
              QUANT: tl.constexpr, GROUPS: tl.constexpr, MODEL_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """[tokens, D_PAD] operands of a product (in the model's dtype, as DOT_DTYPE): stored rows `rows` (an
    index per token) of a part, dequantized in registers when it is stored quantized, so the cache is read in
    its own bytes: x = q * scale in float32, rounded to the model's dtype as the reference's dequantize does.
        auto       D numbers per row, as they are
        int8       D int8 numbers, one float16 scale per row
        fp8_e4m3   D bytes of float8 e4m3, one scale per row
        int4       D / 2 bytes, element 2i in the low nibble and 2i + 1 in the high one, each q + 8; a scale
                   per group of D / GROUPS elements"""
    mask = row_ok[:, None] & dim_ok[None, :]
    if QUANT == AUTO:
        x = tl.load(ptr + rows[:, None] * D + dims[None, :], mask=mask, other=0.0).to(DOT_DTYPE)
    else:
        if QUANT == INT4:
            half = tl.arange(0, D_PAD // 2)
            packed = tl.load(ptr + rows[:, None] * (D // 2) + half[None, :],
                             mask=row_ok[:, None] & (half < D // 2)[None, :], other=0x88).to(tl.int32)  # 0x88: q = 0
            q = tl.interleave((packed & 15) - 8, (packed >> 4) - 8).to(tl.float32)
        elif QUANT == INT8:
            q = tl.load(ptr + rows[:, None] * D + dims[None, :], mask=mask, other=0).to(tl.float32)
        else:  # fp8: every byte the cache holds is finite (quantize clamps to +-448), e4m3's NaN never occurs
            data = tl.load(ptr + rows[:, None] * D + dims[None, :], mask=mask, other=0)
            q = data.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        if GROUPS == 1:
            scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
        else:  # each element's group scale (a few bytes per row, in L1 for the row's other elements)
            scale = tl.load(scale_ptr + rows[:, None] * GROUPS + dims[None, :] // (D // GROUPS), mask=mask, other=0.0)
        x = operand(q * scale.to(tl.float32), MODEL_DTYPE, DOT_DTYPE)
    return x


@triton.jit
def token_rows(ptr, scale_ptr, slots, tok_ok, dims, dim_ok, r, R: tl.constexpr, D: tl.constexpr,
               D_PAD: tl.constexpr, QUANT: tl.constexpr, GROUPS: tl.constexpr, MODEL_DTYPE: tl.constexpr,
               DOT_DTYPE: tl.constexpr):
    """[tokens, D_PAD]: the token factor of rank r of each token; token factors are stored [slots, R, w]."""
    return load_rows(ptr, scale_ptr, slots * R + r, tok_ok, dims, dim_ok, D, D_PAD, QUANT, GROUPS, MODEL_DTYPE,
                     DOT_DTYPE)


@triton.jit
def plain_rows(ptr, scale_ptr, group, num_slots, slots, tok_ok, dims, dim_ok, D: tl.constexpr, D_PAD: tl.constexpr,
               QUANT: tl.constexpr, GROUPS: tl.constexpr, MODEL_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """[tokens, D_PAD]: one kv group's plain keys (or values) of the tile; the part is stored [G, slots, w]."""
    rows = group.to(tl.int64) * num_slots + slots
    return load_rows(ptr, scale_ptr, rows, tok_ok, dims, dim_ok, D, D_PAD, QUANT, GROUPS, MODEL_DTYPE, DOT_DTYPE)


def kernel_parts(kv) -> tuple:
    """(k0, k1, k_scale, v0, v1, v_scale, num_slots): a layer's storage as the kernels take it. A factored
    part is its (head, token) factors; a plain part [G, slots, w] is passed twice (the kernels read only the
    first). The scales of a part stored in the model's dtype are its data again, never read."""
    k0, k1 = kv.k if kv.spec.k_factored else (kv.k[0], kv.k[0])
    v0, v1 = kv.v if kv.spec.v_factored else (kv.v[0], kv.v[0])
    k_scale = kv.k_scale if kv.k_scale is not None else k1
    v_scale = kv.v_scale if kv.v_scale is not None else v1
    num_slots = kv.k[0].shape[0] if kv.spec.k_factored else kv.k[0].shape[1]
    return k0, k1, k_scale, v0, v1, v_scale, num_slots


def quant_config(spec) -> dict:
    """The kernels' constexprs for how keys and values are stored: a code each, and their scales per row."""
    d = spec.head_dim
    return dict(K_QUANT=QUANT_CODES[spec.k_cache_dtype], K_GROUPS=num_groups(spec.k_cache_dtype, d),
                V_QUANT=QUANT_CODES[spec.v_cache_dtype], V_GROUPS=num_groups(spec.v_cache_dtype, d))


TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_dtype(dtype: torch.dtype):
    """The operands' type in the kernels' products: the model's (on a GPU, tensor cores multiply bf16/fp16
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
