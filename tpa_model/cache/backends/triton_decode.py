"""The Triton backend: decode attention straight on the paged cache, plain K/V or TPA factors.

One step's decode sequences (one new query token each, any mix of lengths) are attended in one launch of
`decode_split_kernel` and one launch of `merge_kernel` (flash-decoding):

    grid (head programs, sequences, splits)
    split kernel   each program takes one sequence, a set of query heads and one contiguous range of that
                   sequence's keys (each sequence spreads its own keys over the S splits, in whole tiles and
                   never fewer than a minimum per split); it walks the range in tiles of BLOCK_T tokens,
                   finding each token's slot through the block table (the cache is never gathered into a
                   padded copy), and keeps an online softmax: a running max m, sum l and unnormalized output
                   acc per head, all float32. It writes (m, l, acc) for its split; a split past the
                   sequence's keys writes nothing.
    merge kernel   one program per (sequence, head) rescales the partial results of the splits that held
                   keys to a common max: o = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s.

The grid depends on the batch size and S only, never on the lengths, so a decode step can be captured in a
CUDA graph once per batch size and replayed at any context (the model runner does, with S fixed per size).

Factored parts never rebuild K or V. Per tile and rank r, the queries meet the token factors in one matrix
product and the head factors then weight each (head, token) pair:
    s[h, t] = scale * sum_r a_k[t, r, g(h)] * (q_h . b_k[t, r])
    o_h     = sum_t p[h, t] * sum_r a_v[t, r, g(h)] * b_v[t, r]
so a program reads each token's factors once. The token factors are shared by every kv group, so when both
keys and values are factored one program takes all H query heads (the token factors are read once per
sequence, not once per group); when a part is plain (a standard GQA cache, full rank) a program takes the
query heads of one kv group, which share that group's keys and values. Either way the query heads of a
group are computed together, as the rows of one product.

Numerics follow the reference backend (reference.py): scores are (q . k) * scale with no softcapping, a key
is visible when its position is <= the query's limit and, on a windowed layer, within `window` positions of
the query; products accumulate in float32; p (times the value head factor) is cast to the model's dtype
before its product with the values, as the reference does. New keys and values are written by the reference's
index_copy_ (one indexed copy per stored tensor), quantized there when a part is stored in 8 or 4 bits
(quantization.py). Prefill chunks run on the kernel in triton_prefill.py.

A quantized part (int8, fp8_e4m3 or int4 plain rows or token factors) is read in its own bytes: each tile's
rows are dequantized in registers (q * scale in float32, rounded to the model's dtype as the reference's
dequantize does) right before their product, so a step reads 1 or 1/2 byte per number plus the scales.

On a CPU the kernels run only under TRITON_INTERPRET=1 (Triton's interpreter, used by the tests).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..kv_cache import LayerKV
from ..metadata import AttentionMetadata, PoolMetadata
from .reference import ReferenceBackend
from .triton_common import (
    MIN_DOT,
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
from .triton_prefill import prefill_attention

MERGE_SPLITS = 16  # splits the merge kernel reads at a time


@triton.jit
def _load_query(q_ptr, seq, heads, head_ok, dims, dim_ok, q_seq_stride, H_STRIDE: tl.constexpr):
    """[HEADS, D] queries of one sequence (padding rows and columns are zero)."""
    ptrs = q_ptr + seq * q_seq_stride + heads[:, None] * H_STRIDE + dims[None, :]
    return tl.load(ptrs, mask=head_ok[:, None] & dim_ok[None, :], other=0.0)


@triton.jit
def _head_factor(ptr, slots, tok_ok, groups, head_ok, r, R: tl.constexpr, G: tl.constexpr):
    """[HEADS, BLOCK_T]: a[t, r, g(h)], the head factor of rank r of each token, for each query head's group.
    A head factor is R * G numbers per token; the few bytes a row reads stay in L1 for the other ranks."""
    ptrs = ptr + slots[None, :] * (R * G) + r * G + groups[:, None]
    return tl.load(ptrs, mask=head_ok[:, None] & tok_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _key_range(first_ptr, pos_ptr, limit_ptr, seq, window):
    """The keys a decode query sees, [lo, hi) in the coordinates of its block table (column 0 is position
    first): from the window's start (or the table's) up to its limit, inclusive. Returns (first, lo, hi)."""
    first = tl.load(first_ptr + seq)
    hi = tl.load(limit_ptr + seq) - first + 1
    lo = hi * 0  # no window: from the first column
    if window > 0:
        lo = tl.maximum(tl.load(pos_ptr + seq) - window + 1 - first, 0)
    return first, lo, hi


@triton.jit
def _split_length(num_keys, S, min_split, BLOCK_T: tl.constexpr):
    """Keys per split of one sequence: its own keys spread over the S splits in whole tiles, but never fewer
    than min_split (a multiple of BLOCK_T). Each sequence splits its own length, so the grid (S) does not
    depend on the lengths, and a step replayed from a CUDA graph still balances every sequence."""
    per_split = (num_keys + S - 1) // S
    return tl.maximum((per_split + BLOCK_T - 1) // BLOCK_T * BLOCK_T, min_split)


@triton.jit(do_not_specialize=["table_stride"])  # the step's table width: one compiled kernel for every width
def decode_split_kernel(
    q_ptr, q_seq_stride,
    k0_ptr, k1_ptr, k_scale_ptr, v0_ptr, v1_ptr, v_scale_ptr, num_slots,  # see kernel_parts
    table_ptr, table_stride, first_ptr, pos_ptr, limit_ptr,
    m_ptr, l_ptr, acc_ptr,  # partial results: [B, H, S], [B, H, S], [B, H, S, d] float32
    scale, window, min_split,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
    K_FACTORED: tl.constexpr, V_FACTORED: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr,
    K_QUANT: tl.constexpr, K_GROUPS: tl.constexpr, V_QUANT: tl.constexpr, V_GROUPS: tl.constexpr,
    MODEL_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    head_prog, seq, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    S = tl.num_programs(2)
    HG: tl.constexpr = H // G  # query heads per kv group

    heads = head_prog * HEADS + tl.arange(0, HEADS_PAD)
    head_ok = tl.arange(0, HEADS_PAD) < HEADS
    groups = heads // HG  # the kv group of each query head (only read where head_ok)
    group = head_prog * HEADS // HG  # a plain part's group: such programs hold the heads of one group
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D

    first, lo, hi = _key_range(first_ptr, pos_ptr, limit_ptr, seq, window)
    split_len = _split_length(hi - lo, S, min_split, BLOCK_T)
    start = lo + split * split_len
    end = tl.minimum(hi, start + split_len)

    # a split past the sequence's keys reads nothing and writes nothing (the merge skips it)
    keep = head_ok & (start + 0 * heads < end)
    q = _load_query(q_ptr, seq, heads, keep, dims, dim_ok, q_seq_stride, D)
    q = operand(q, MODEL_DTYPE, DOT_DTYPE)
    m = tl.full([HEADS_PAD], NEG, tl.float32)
    l = tl.zeros([HEADS_PAD], tl.float32)
    acc = tl.zeros([HEADS_PAD, D_PAD], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tok_ok = t < end
        slots = table_slots(table_ptr, seq, table_stride, t, tok_ok, BLOCK_SIZE)

        # scores [HEADS, BLOCK_T], float32
        if K_FACTORED:
            s = tl.zeros([HEADS_PAD, BLOCK_T], tl.float32)
            for r in tl.static_range(RK):
                b = token_rows(k1_ptr, k_scale_ptr, slots, tok_ok, dims, dim_ok, r, RK, D, D_PAD, K_QUANT, K_GROUPS,
                               MODEL_DTYPE, DOT_DTYPE)
                qb = tl.dot(q, tl.trans(b), input_precision=DOT_PRECISION)
                s += qb * _head_factor(k0_ptr, slots, tok_ok, groups, head_ok, r, RK, G)
        else:
            k = plain_rows(k0_ptr, k_scale_ptr, group, num_slots, slots, tok_ok, dims, dim_ok, D, D_PAD, K_QUANT,
                           K_GROUPS, MODEL_DTYPE, DOT_DTYPE)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = tl.where(tok_ok[None, :], s * scale, float("-inf"))

        # online softmax: rescale what came before to the new running max
        m, l, p, alpha = online_softmax_step(m, l, s)
        acc = acc * alpha[:, None]

        # values: acc += p V, V rank by rank from its factors (p a_v cast to the model dtype, as the reference)
        if V_FACTORED:
            for r in tl.static_range(RV):
                b = token_rows(v1_ptr, v_scale_ptr, slots, tok_ok, dims, dim_ok, r, RV, D, D_PAD, V_QUANT, V_GROUPS,
                               MODEL_DTYPE, DOT_DTYPE)
                pa = p * _head_factor(v0_ptr, slots, tok_ok, groups, head_ok, r, RV, G)
                acc += tl.dot(operand(pa, MODEL_DTYPE, DOT_DTYPE), b, input_precision=DOT_PRECISION)
        else:
            v = plain_rows(v0_ptr, v_scale_ptr, group, num_slots, slots, tok_ok, dims, dim_ok, D, D_PAD, V_QUANT,
                           V_GROUPS, MODEL_DTYPE, DOT_DTYPE)
            acc += tl.dot(operand(p, MODEL_DTYPE, DOT_DTYPE), v, input_precision=DOT_PRECISION)

    row = (seq * H + heads) * S + split  # [HEADS_PAD] index into [B, H, S]
    tl.store(m_ptr + row, m, mask=keep)
    tl.store(l_ptr + row, l, mask=keep)
    tl.store(acc_ptr + row[:, None] * D + dims[None, :], acc, mask=keep[:, None] & dim_ok[None, :])


@triton.jit(do_not_specialize=["S"])  # the step's split count: one compiled kernel for every count
def merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, out_seq_stride, first_ptr, pos_ptr, limit_ptr, window, min_split,
                 S, H: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, S_BLOCK: tl.constexpr,
                 D_PAD: tl.constexpr):
    """One (sequence, head): the partial softmaxes of the splits that held keys, merged to one output row,
    S_BLOCK splits at a time: o = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s."""
    seq, head = tl.program_id(0), tl.program_id(1)
    _, lo, hi = _key_range(first_ptr, pos_ptr, limit_ptr, seq, window)
    split_len = _split_length(hi - lo, S, min_split, BLOCK_T)
    used = (hi - lo + split_len - 1) // split_len  # >= 1: a query always sees itself
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D
    m_run = tl.full([1], NEG, tl.float32)
    total = tl.zeros([1], tl.float32)
    out = tl.zeros([D_PAD], tl.float32)
    for s0 in range(0, used, S_BLOCK):
        splits = s0 + tl.arange(0, S_BLOCK)
        split_ok = splits < used
        row = (seq * H + head) * S + splits
        m = tl.load(m_ptr + row, mask=split_ok, other=NEG)
        l = tl.load(l_ptr + row, mask=split_ok, other=0.0)
        acc = tl.load(acc_ptr + row[:, None] * D + dims[None, :], mask=split_ok[:, None] & dim_ok[None, :],
                      other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        w = tl.exp(m - m_new)  # splits past `used` (m = NEG) weigh 0
        alpha = tl.exp(m_run - m_new)
        total = total * alpha + tl.sum(w * l, axis=0)
        out = out * alpha + tl.sum(w[:, None] * acc, axis=0)
        m_run = m_new
    out = out / tl.maximum(total, 1e-30)
    tl.store(out_ptr + seq * out_seq_stride + head * D + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


class TritonBackend(ReferenceBackend):
    """Decode on the Triton kernels above, prefill chunks on triton_prefill's; writes as the reference backend.

    block_t: tokens per tile (a multiple of 16), or None: 32 on plain layouts, 16 when a part is factored.
    Those and 8 warps are the choices that ptxas compiles for sm_90 at the 12b and 27b shapes with no (plain)
    or almost no (factors) register spills; they are not tuned on a GPU yet. split_tokens: tokens per split,
    fixed (tests), or None to choose per step: enough splits that the launch fills the device (about
    programs_target programs), but never splits shorter than min_split_tokens, where the merge would cost
    more than it spreads (see choose_splits).
    """

    name = "triton"

    def __init__(self, block_t: int | None = None, split_tokens: int | None = None, min_split_tokens: int = 256,
                 programs_target: int | None = None, **reference_args):
        super().__init__(**reference_args)
        if block_t is not None and block_t % MIN_DOT:
            raise ValueError(f"block_t must be a multiple of {MIN_DOT}, not {block_t}")
        self.block_t, self.split_tokens, self.min_split_tokens = block_t, split_tokens, min_split_tokens
        self.programs_target = programs_target

    def decode(self, q: torch.Tensor, kv: LayerKV, pool: PoolMetadata, meta: AttentionMetadata, scale: float):
        B, H, d = q.shape  # B decode sequences
        q = q.contiguous()
        config = self.kernel_config(kv.spec, H, pool.block_size)
        head_programs = H // config["HEADS"]
        # the longest visible key range, from the host copy of the tables (no device sync); a windowed pool's
        # table holds only the window's blocks. A captured step's metadata gives its tables' full width.
        max_tokens = pool.decode_blocks(B) * pool.block_size
        S, min_split = self.choose_splits(max_tokens, B * head_programs, q.device, config["BLOCK_T"])
        m = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty(B, H, S, d, dtype=torch.float32, device=q.device)
        table, window = pool.block_tables, pool.window or 0
        decode_split_kernel[(head_programs, B, S)](
            q, q.stride(0), *kernel_parts(kv),
            table, table.stride(0), pool.first_key_pos, meta.positions, meta.limits,
            m, l, acc, scale, window, min_split, **config, num_warps=8,
        )
        out = torch.empty_like(q)
        merge_kernel[(B, H)](m, l, acc, out, out.stride(0), pool.first_key_pos, meta.positions, meta.limits, window,
                             min_split, S, H=H, D=d, BLOCK_T=config["BLOCK_T"], S_BLOCK=MERGE_SPLITS, D_PAD=pad(d))
        return out

    def prefill(self, q: torch.Tensor, kv: LayerKV, pool: PoolMetadata, meta: AttentionMetadata, scale: float):
        return prefill_attention(q, kv, pool, meta, scale)

    def kernel_config(self, spec, H: int, block_size: int) -> dict:
        """The split kernel's compile-time parameters for a layer's cache spec and H query heads."""
        G, d = spec.kv_heads, spec.head_dim
        both = spec.k_factored and spec.v_factored
        # both parts factored: all heads in one program (token factors read once); else one kv group's heads
        heads = H if both else H // G
        block_t = self.block_t or (16 if spec.k_factored or spec.v_factored else 32)
        return dict(H=H, G=G, D=d, HEADS=heads, HEADS_PAD=pad(heads), D_PAD=pad(d), BLOCK_SIZE=block_size,
                    BLOCK_T=block_t, K_FACTORED=spec.k_factored, V_FACTORED=spec.v_factored,
                    RK=spec.k_rank, RV=spec.v_rank, **quant_config(spec), MODEL_DTYPE=TL_DTYPES[spec.dtype],
                    DOT_DTYPE=dot_dtype(spec.dtype),
                    DOT_PRECISION="ieee" if spec.dtype == torch.float32 else None)  # ieee: no tf32 in fp32

    def choose_splits(self, max_tokens: int, programs: int, device: torch.device, block_t: int) -> tuple[int, int]:
        """(S, min_split): the number of splits and the fewest keys a split takes (a multiple of the tile).
        Fixed split_tokens: as many splits as the longest sequence needs. Else enough splits to fill the
        device, but none shorter than min_split_tokens, where the merge would cost more than it spreads."""
        if self.split_tokens is not None:
            min_split = triton.cdiv(max(1, self.split_tokens), block_t) * block_t
            return triton.cdiv(max_tokens, min_split), min_split
        min_split = triton.cdiv(self.min_split_tokens, block_t) * block_t
        target = self.programs_target or device_programs(device)
        return max(1, min(triton.cdiv(target, programs), triton.cdiv(max_tokens, min_split))), min_split


@functools.lru_cache
def device_programs(device: torch.device) -> int:
    """Programs that keep a GPU busy: four per streaming multiprocessor (the split count aims at it)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter on a CPU: any small number exercises the splits
