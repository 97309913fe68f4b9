"""Prefill attention in Triton: every prefill chunk of a step, over its cached prefix and itself, in one launch.

    grid (query tiles, prefill sequences, kv groups)
    each program takes BLOCK_M new tokens of one sequence and the query heads of one kv group: a tile of
    ROWS = BLOCK_M x (H / G) query rows that share every key. It walks the keys those queries can see in tiles
    of BLOCK_N tokens, each token's slot found through the sequence's block table, and keeps an online
    softmax (running max, sum and output per row, float32) as the decode kernel does.

A chunk's many queries share every key, so unlike decode a tile's keys and values are rebuilt from their
factors inside the kernel, R d multiply-adds per key and group, and then met by all ROWS queries in one
product: K[t] = sum_r a_k[t, r, g] b_k[t, r] (and V the same). Only one tile of them ever exists, in
registers: the whole context's K and V are never materialized, whatever the prefix length. At rank 1 there
is nothing to sum: the queries meet the token factors, and the head factors scale the scores (keys) or the
probabilities (values). Plain parts (a standard cache) are read as they are. A quantized part's rows (plain
rows or token factors in int8, fp8_e4m3 or int4) are dequantized in registers as a tile is loaded, as in the
decode kernel: the cache is read in its own bytes.

Numerics follow the reference backend's prefill (reference.dense_parts): rows dequantized to the model's
dtype, keys rebuilt in float32 from the factors and rounded to the model's dtype (rank >= 2), scores
(q . k) * scale in float32, a key visible when its position is <= the query's limit and, on a windowed layer,
within `window` positions of the query; p cast to the model's dtype before its product with the values.
Query tiles past the end of a shorter chunk mask everything and store nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kv_cache import LayerKV
from ..metadata import AttentionMetadata, PoolMetadata
from .triton_common import (
    NEG,
    TL_DTYPES,
    dot_dtype,
    kernel_parts,
    online_softmax_step,
    operand,
    pad,
    plain_rows,
    quant_config,
    table_slots,
    token_rows,
)


@triton.jit
def _group_factor(ptr, slots, tok_ok, group, r, R: tl.constexpr, G: tl.constexpr):
    """[tokens] float32: a[t, r, group], the head factor of rank r of each token for one kv group."""
    return tl.load(ptr + slots * (R * G) + r * G + group, mask=tok_ok, other=0.0).to(tl.float32)


@triton.jit
def _key_tile(part0_ptr, part1_ptr, scale_ptr, group, num_slots, slots, tok_ok, dims, dim_ok,
              FACTORED: tl.constexpr, R: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
              D_PAD: tl.constexpr, QUANT: tl.constexpr, GROUPS: tl.constexpr, MODEL_DTYPE: tl.constexpr,
              DOT_DTYPE: tl.constexpr):
    """[BLOCK_N, D_PAD] keys (or values) of kv group `group` for a tile of slots: plain rows as stored
    ([G, slots, w]), or rebuilt from the factors (head [slots, R, G], token [slots, R, w]); quantized rows
    dequantized first."""
    if FACTORED:
        rows = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        for r in tl.static_range(R):
            a = _group_factor(part0_ptr, slots, tok_ok, group, r, R, G)
            b = token_rows(part1_ptr, scale_ptr, slots, tok_ok, dims, dim_ok, r, R, D, D_PAD, QUANT, GROUPS,
                           MODEL_DTYPE, DOT_DTYPE)
            rows += a[:, None] * b.to(tl.float32)
        return operand(rows, MODEL_DTYPE, DOT_DTYPE)
    return plain_rows(part0_ptr, scale_ptr, group, num_slots, slots, tok_ok, dims, dim_ok, D, D_PAD, QUANT, GROUPS,
                      MODEL_DTYPE, DOT_DTYPE)


# the step's sequence and row offsets and table width: one compiled kernel for any of their values
@triton.jit(do_not_specialize=["first_seq", "row_offset", "table_stride"])
def prefill_kernel(
    q_ptr, q_tok_stride, out_ptr, out_tok_stride,
    k0_ptr, k1_ptr, k_scale_ptr, v0_ptr, v1_ptr, v_scale_ptr, num_slots,  # see kernel_parts
    query_start_ptr, first_seq, row_offset,  # the step's row offsets of each sequence; q's row 0 is row_offset
    table_ptr, table_stride, first_ptr, pos_ptr, limit_ptr,  # pos and limit: per row of the step
    scale, window,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
    D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    K_FACTORED: tl.constexpr, V_FACTORED: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr,
    K_QUANT: tl.constexpr, K_GROUPS: tl.constexpr, V_QUANT: tl.constexpr, V_GROUPS: tl.constexpr,
    MODEL_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile, seq, group = tl.program_id(0), first_seq + tl.program_id(1), tl.program_id(2)
    HG: tl.constexpr = H // G  # query heads per kv group: row i is token i // HG, head group * HG + i % HG
    q_lo = tl.load(query_start_ptr + seq)
    q_hi = tl.load(query_start_ptr + seq + 1)

    rows = tl.arange(0, ROWS)
    step_row = q_lo + tile * BLOCK_M + rows // HG  # the step's row of each query
    token = step_row - row_offset  # its row in q and out
    head = group * HG + rows % HG
    row_ok = (rows < BLOCK_M * HG) & (step_row < q_hi)
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + token[:, None] * q_tok_stride + head[:, None] * D + dims[None, :], mask=q_mask, other=0.0)
    q = operand(q, MODEL_DTYPE, DOT_DTYPE)
    q_pos = tl.load(pos_ptr + step_row, mask=row_ok, other=0)
    q_limit = tl.load(limit_ptr + step_row, mask=row_ok, other=-1)  # padding rows see no key

    # The keys any of these queries sees, in block-table columns (column 0 is position `first`): up to the
    # largest limit, and on a windowed layer from the earliest query's window start.
    first = tl.load(first_ptr + seq)
    hi = tl.max(q_limit, axis=0) - first + 1
    lo = hi * 0
    if window > 0:
        earliest = tl.min(tl.where(row_ok, q_pos, q_pos + (1 << 40)), axis=0)
        lo = tl.maximum(earliest - window + 1 - first, 0)

    m = tl.full([ROWS], NEG, tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_PAD], tl.float32)
    for t0 in range(lo, hi, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tok_ok = t < hi
        slots = table_slots(table_ptr, seq, table_stride, t, tok_ok, BLOCK_SIZE)
        key_pos = first + t

        if K_FACTORED and RK == 1:  # rank 1: (q . b) a, the token factor as it is stored
            b = token_rows(k1_ptr, k_scale_ptr, slots, tok_ok, dims, dim_ok, 0, 1, D, D_PAD, K_QUANT, K_GROUPS,
                           MODEL_DTYPE, DOT_DTYPE)
            a = _group_factor(k0_ptr, slots, tok_ok, group, 0, 1, G)
            s = tl.dot(q, tl.trans(b), input_precision=DOT_PRECISION) * a[None, :] * scale
        else:
            k = _key_tile(k0_ptr, k1_ptr, k_scale_ptr, group, num_slots, slots, tok_ok, dims, dim_ok, K_FACTORED,
                          RK, G, D, BLOCK_N, D_PAD, K_QUANT, K_GROUPS, MODEL_DTYPE, DOT_DTYPE)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        visible = tok_ok[None, :] & (key_pos[None, :] <= q_limit[:, None])
        if window > 0:
            visible = visible & (q_pos[:, None] - key_pos[None, :] < window)
        s = tl.where(visible, s, float("-inf"))

        m, l, p, alpha = online_softmax_step(m, l, s)

        if V_FACTORED and RV == 1:  # rank 1: (p a) b
            b = token_rows(v1_ptr, v_scale_ptr, slots, tok_ok, dims, dim_ok, 0, 1, D, D_PAD, V_QUANT, V_GROUPS,
                           MODEL_DTYPE, DOT_DTYPE)
            pv = operand(p * _group_factor(v0_ptr, slots, tok_ok, group, 0, 1, G)[None, :], MODEL_DTYPE, DOT_DTYPE)
            acc = acc * alpha[:, None] + tl.dot(pv, b, input_precision=DOT_PRECISION)
        else:
            v = _key_tile(v0_ptr, v1_ptr, v_scale_ptr, group, num_slots, slots, tok_ok, dims, dim_ok, V_FACTORED,
                          RV, G, D, BLOCK_N, D_PAD, V_QUANT, V_GROUPS, MODEL_DTYPE, DOT_DTYPE)
            acc = acc * alpha[:, None] + tl.dot(operand(p, MODEL_DTYPE, DOT_DTYPE), v, input_precision=DOT_PRECISION)

    out = acc / tl.maximum(l, 1e-30)[:, None]  # > 0 on every real row: a query always sees itself
    out_ptrs = out_ptr + token[:, None] * out_tok_stride + head[:, None] * D + dims[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def prefill_config(spec, H: int, block_size: int, rows: int | None = None, block_n: int | None = None) -> dict:
    """The prefill kernel's compile-time parameters: a tile of `rows` query rows (tokens x the heads of a
    group) and BLOCK_N keys per step. By default 64 rows and 32 keys, or 32 and 16 at head_dim 256: with 8
    warps, the largest tiles that ptxas compiles for sm_90 without register spills at the 12b, 27b and
    SmolLM2 shapes (bf16, any rank). Not tuned on a GPU yet."""
    G, d = spec.kv_heads, spec.head_dim
    HG = H // G
    rows = rows or (32 if d > 128 else 64)
    rows = max(pad(rows), pad(HG))  # a power of two that holds at least one token's heads
    return dict(H=H, G=G, D=d, ROWS=rows, BLOCK_M=rows // HG, D_PAD=pad(d), BLOCK_SIZE=block_size,
                BLOCK_N=block_n or (16 if d > 128 else 32), K_FACTORED=spec.k_factored, V_FACTORED=spec.v_factored,
                RK=spec.k_rank, RV=spec.v_rank, **quant_config(spec), MODEL_DTYPE=TL_DTYPES[spec.dtype],
                DOT_DTYPE=dot_dtype(spec.dtype),
                DOT_PRECISION="ieee" if spec.dtype == torch.float32 else None)


def prefill_attention(q: torch.Tensor, kv: LayerKV, pool: PoolMetadata, meta: AttentionMetadata, scale: float,
                      rows: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """q [P, H, d]: the new tokens of the step's prefill sequences (the rows after the decodes), in order.
    Returns [P, H, d]. One launch for all of them."""
    P, H, d = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    first_seq, num_seqs = meta.num_decodes, meta.num_seqs - meta.num_decodes
    offset = meta.query_start[first_seq]  # q's row 0 is this row of the step
    longest = max(meta.query_start[i + 1] - meta.query_start[i] for i in meta.prefill_seqs())
    config = prefill_config(kv.spec, H, pool.block_size, rows, block_n)
    table = pool.block_tables
    grid = (triton.cdiv(longest, config["BLOCK_M"]), num_seqs, kv.spec.kv_heads)
    prefill_kernel[grid](
        q, q.stride(0), out, out.stride(0), *kernel_parts(kv),
        meta.seq_starts, first_seq, offset, table, table.stride(0), pool.first_key_pos, meta.positions, meta.limits,
        scale, pool.window or 0, **config, num_warps=8,
    )
    return out
