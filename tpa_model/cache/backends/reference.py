"""The PyTorch reference backend: attention over plain or factored caches, read through block tables.

Keys are visited in tiles of whole blocks, gathered for all sequences at once and merged with an online
softmax (flash-decoding's split along the sequence, done one tile after another). A tile's size is bounded
in bytes and in score elements, so memory stays flat at any context length and a tile's gathered factors
are still in cache when the products read them.

On factors, every query head meets the token factors in one product (they are shared by all heads), and the
head factors then weight each (token, rank) pair per kv group:
    s[h, t] = scale * sum_r a_k[t, r, g(h)] * (q_h . b_k[t, r])
    o_h     = sum_{t, r} (p[h, t] * a_v[t, r, g(h)]) * b_v[t, r]
Plain parts are standard GQA: the query heads of a group against that group's keys. A prefill chunk's many
queries share every key, so there a tile's keys and values are rebuilt from their factors first (R d work per
key, against M R d for attending on factors with M queries), one tile at a time.

A quantized part (int8, fp8, int4: quantization.py) is quantized once, when its token is written, and read
back tile by tile, so the whole context is never dequantized at once (prefill chunks on a quantized plain
cache take the tiled path too, not the fused kernel over the whole visible context). A row with one scale
(int8, fp8) enters the products as its stored numbers, and its scale multiplies what the row produced: the
scores of a key, the probabilities of a value (or the head factors that weigh a token factor), T numbers per
row instead of T x d. int4 rows, with a scale per 32 numbers, are dequantized before the products.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kv_cache import LayerKV
from ..metadata import AttentionMetadata, PoolMetadata
from ..quantization import dequantize, is_quantized, is_rotated, quantize, rotation, stored_values

TILE_BYTES = 4 << 20  # cache bytes gathered per tile
TILE_SCORES = 8 << 20  # score elements per tile
NEG = -1e30  # running-max floor: a fully masked tile then adds exp(-inf) = 0, never NaN


class ReferenceBackend:
    name = "reference"

    def __init__(self, tile_bytes: int = TILE_BYTES, tile_scores: int = TILE_SCORES):
        self.tile_bytes, self.tile_scores = tile_bytes, tile_scores

    def write(self, kv: LayerKV, slots: torch.Tensor, k: tuple[torch.Tensor, ...], v: tuple[torch.Tensor, ...]):
        """The new tokens' parts into their slots; a quantized part's rows (plain rows, token factors) are
        quantized here, once, with their scales written beside them (int4 rows rotated first)."""
        for part, new in (("k", k), ("v", v)):
            stored = kv.stored(part)
            factored = len(stored) == 2
            kind = kv.spec.cache_dtype(part)
            rows = new[-1]  # plain [N, G, d], or the token factors [N, R, d]
            if factored:
                stored[0].index_copy_(0, slots, new[0].to(stored[0].dtype))  # head factors [slots, R, G]
            if is_rotated(kind):
                rows = rows @ rotation(rows.shape[-1], rows.device, rows.dtype)
            if is_quantized(kind):
                rows, scale = quantize(rows, kind)
                store_rows(kv.scale(part), slots, scale, factored)
            store_rows(stored[-1], slots, rows, factored)

    def decode(self, q: torch.Tensor, kv: LayerKV, pool: PoolMetadata, meta: AttentionMetadata, scale: float):
        D = q.shape[0]
        nb = pool.decode_blocks(D)
        out = self.attend(
            q.unsqueeze(2), kv, pool.block_tables[:D, :nb], pool.first_key_pos[:D],
            meta.positions[:D, None], meta.limits[:D, None], pool.window, pool.block_size, scale,
        )
        return out[:, :, 0]

    def prefill(self, q: torch.Tensor, kv: LayerKV, pool: PoolMetadata, meta: AttentionMetadata, scale: float):
        """Sequence by sequence."""
        offset = meta.query_start[meta.num_decodes]
        out = torch.empty_like(q)
        for seq in meta.prefill_seqs():
            lo, hi = meta.query_start[seq], meta.query_start[seq + 1]
            out[lo - offset : hi - offset] = self.prefill_one(q[lo - offset : hi - offset], kv, pool, meta, seq, scale)
        return out

    def prefill_one(self, q: torch.Tensor, kv: LayerKV, pool: PoolMetadata, meta: AttentionMetadata, seq: int,
                    scale: float) -> torch.Tensor:
        """q [L, H, d]: the new tokens of sequence `seq`, over its cached prefix and itself."""
        lo, hi = meta.query_start[seq], meta.query_start[seq + 1]
        table = pool.block_tables[seq : seq + 1, : pool.num_blocks[seq]]
        args = (kv, table, pool.first_key_pos[seq : seq + 1], meta.positions[None, lo:hi], meta.limits[None, lo:hi],
                pool.window, pool.block_size, scale)
        q = q.transpose(0, 1).unsqueeze(0)  # [1, H, L, d]
        if kv.spec.k_factored or kv.spec.v_factored or kv.spec.quantized:
            out = self.attend(q, *args)
        else:
            out = plain_prefill(q, *args)
        return out[0].transpose(0, 1)

    # -- the tiled loop ---------------------------------------------------------------------------------

    def attend(self, q, kv: LayerKV, table, first_pos, q_pos, limits, window, block_size, scale) -> torch.Tensor:
        """q [B, H, L, d]; table [B, nb]; first_pos [B]; q_pos, limits [B, L]. Returns [B, H, L, d]."""
        B, H, L, d = q.shape
        G = kv.spec.kv_heads
        q = q.contiguous().view(B, G, H // G * L, d)
        tile = self.tile_blocks(B, H, L, kv, block_size)
        nb = table.shape[1]
        dense = dense_parts(kv, H // G * L)
        if nb <= tile:  # one tile: a plain softmax
            s = masked_scores(q, kv, table, first_pos, 0, q_pos, limits, window, block_size, scale, L, dense[0])
            out = tile_values(torch.softmax(s, dim=-1), kv, table, block_size, dense[1])
        else:
            tiles = ((table[:, j : j + tile], j * block_size) for j in range(0, nb, tile))
            out = online_softmax(q, kv, tiles, first_pos, q_pos, limits, window, block_size, scale, L, dense)
        return out.reshape(B, H, L, d).to(q.dtype)

    def tile_blocks(self, B: int, H: int, L: int, kv: LayerKV, block_size: int) -> int:
        """Blocks per tile: the gathered cache (in the model's dtype, as a quantized tile is once read back)
        and the scores both stay within their budgets."""
        bytes_per_token = sum(math.prod(shape) for shape in kv.spec.part_shapes()) * kv.spec.dtype.itemsize
        scores_per_token = B * H * L * (kv.spec.k_rank if kv.spec.k_factored else 1)
        tokens = min(self.tile_bytes // (B * bytes_per_token), self.tile_scores // scores_per_token)
        return max(1, tokens // block_size)


def dense_parts(kv: LayerKV, queries_per_group: int) -> tuple[bool, bool]:
    """Whether to rebuild a tile's keys (values) from their factors before the product. Per key and group,
    attending on factors costs M R d multiply-adds for M queries; rebuilding costs R d, then M d. With many
    queries (a prefill chunk) and R >= 2 rebuilding is cheaper; one decode query reads the factors only."""
    M = queries_per_group
    k_rank, v_rank = kv.spec.k_rank, kv.spec.v_rank
    return (kv.spec.k_factored and M * (k_rank - 1) > k_rank and M > 1,
            kv.spec.v_factored and M * (v_rank - 1) > v_rank and M > 1)


def online_softmax(q, kv: LayerKV, tiles, first_pos, q_pos, limits, window, block_size, scale, L,
                   dense=(False, False)) -> torch.Tensor:
    """softmax(s) V over tiles of keys, one after another: a running max, sum and output rescaled per tile."""
    B, G, M, d = q.shape
    m = torch.full((B, G, M // L, L, 1), NEG, device=q.device)
    total = torch.zeros_like(m)
    acc = torch.zeros(B, G, M // L, L, d, device=q.device)
    for blocks, offset in tiles:
        s = masked_scores(q, kv, blocks, first_pos, offset, q_pos, limits, window, block_size, scale, L, dense[0])
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        p = torch.exp(s - m_new)
        alpha = torch.exp(m - m_new)
        total = total * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + tile_values(p, kv, blocks, block_size, dense[1])
        m = m_new
    return acc / total


def key_visibility(first_pos, offset, T, q_pos, limits, window) -> torch.Tensor:
    """Bool [B, L, T]: key t of the tile (position first_pos + offset + t) is visible to each query."""
    key_pos = first_pos[:, None] + offset + torch.arange(T, device=first_pos.device)  # [B, T]
    visible = key_pos[:, None, :] <= limits[:, :, None]
    if window is not None:
        visible &= (q_pos[:, :, None] - key_pos[:, None, :]) < window
    return visible


def masked_scores(q, kv: LayerKV, blocks, first_pos, offset, q_pos, limits, window, block_size, scale, L,
                  dense: bool = False):
    """Float32 scores [B, G, H/G, L, T] of one tile, invisible keys at -inf. q: [B, G, H/G * L, d]."""
    B, G = q.shape[:2]
    T = blocks.shape[1] * block_size
    if kv.spec.k_factored and not dense:
        s = factor_scores(q, kv, "k", blocks, block_size).view(B, G, -1, L, T).float()
    elif dense:
        k = rebuild(kv, "k", blocks, block_size)
        s = torch.matmul(q.transpose(0, 1), k.transpose(-1, -2)).float().view(G, B, -1, L, T).transpose(0, 1)
    else:  # group-major: a view, no copy
        k, row_scale = plain_tile(kv, "k", blocks, block_size)
        s = torch.matmul(q.transpose(0, 1), k.transpose(-1, -2)).float()  # [G, B, M, T]
        if row_scale is not None:
            s = s * row_scale.unsqueeze(2)
        s = s.view(G, B, -1, L, T).transpose(0, 1)
    visible = key_visibility(first_pos, offset, T, q_pos, limits, window)
    return (s * scale).masked_fill(~visible[:, None, None], float("-inf"))


def gather_plain(store: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """[G, B, T, d]: the tile's blocks of a plain part [G, slots, d], one contiguous copy per block."""
    G, _, d = store.shape
    tile = store.view(G, -1, block_size * d).index_select(1, blocks.reshape(-1))
    return tile.view(G, blocks.shape[0], -1, d)


def gather_factor(store: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, T, R, width]: the tile's blocks of a factor tensor [slots, R, width]."""
    _, R, width = store.shape
    tile = store.view(-1, block_size * R * width).index_select(0, blocks.reshape(-1))
    return tile.view(blocks.shape[0], -1, R, width)


def store_rows(store: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, factored: bool) -> None:
    """New rows into their slots: token factors [N, R, w] into [slots, R, w], plain [N, G, w] into [G, slots, w]."""
    if factored:
        store.index_copy_(0, slots, rows.to(store.dtype))
    else:
        store.index_copy_(1, slots, rows.transpose(0, 1).to(store.dtype))


def plain_tile(kv: LayerKV, part: str, blocks, block_size) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A plain part's rows of the tile, [G, B, T, d] in the model's dtype, and the scale of each row [G, B, T]
    (float32) that the caller applies to what the row produces; None when the rows come dequantized."""
    rows = gather_plain(kv.stored(part)[0], blocks, block_size)
    kind = kv.spec.cache_dtype(part)
    if not is_quantized(kind):
        return rows, None
    return read_rows(rows, gather_plain(kv.scale(part), blocks, block_size), kind, kv.spec.dtype)


def token_tile(kv: LayerKV, part: str, blocks, block_size) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A factored part's token factors of the tile, [B, T, R, d] in the model's dtype, and each one's scale
    [B, T, R] (float32) for the caller to apply; None when the rows come dequantized."""
    rows = gather_factor(kv.stored(part)[1], blocks, block_size)
    kind = kv.spec.cache_dtype(part)
    if not is_quantized(kind):
        return rows, None
    return read_rows(rows, gather_factor(kv.scale(part), blocks, block_size), kind, kv.spec.dtype)


def read_rows(data: torch.Tensor, scale: torch.Tensor, kind: str, dtype: torch.dtype):
    """(stored numbers, row scale) for rows with one scale; (dequantized rows, None) for grouped ones."""
    if scale.shape[-1] == 1:
        return stored_values(data, kind).to(dtype), scale[..., 0].float()
    return dequantize(data, scale, kind, dtype), None


def head_factors(kv: LayerKV, part: str, blocks, block_size, row_scale: torch.Tensor | None) -> torch.Tensor:
    """[B, T, R, G]: the tile's head factors, times each token factor's scale when it is applied here."""
    a = gather_factor(kv.stored(part)[0], blocks, block_size)
    return a if row_scale is None else a * row_scale.unsqueeze(-1).to(a.dtype)


def rebuild(kv: LayerKV, part: str, blocks, block_size) -> torch.Tensor:
    """[G, B, T, d]: one tile's keys (or values) rebuilt from its factors, sum_r a[t, r, g] b[t, r]."""
    b, row_scale = token_tile(kv, part, blocks, block_size)  # [B, T, R, d]
    a = head_factors(kv, part, blocks, block_size, row_scale)  # [B, T, R, G]
    return (a.unsqueeze(-1) * b.unsqueeze(-2)).sum(2).permute(2, 0, 1, 3).contiguous()


def factor_scores(q, kv: LayerKV, part: str, blocks, block_size) -> torch.Tensor:
    """[B, G, M, T]: all query heads against the token factors in one product, then the head factors."""
    B, G, M, d = q.shape
    token, row_scale = token_tile(kv, part, blocks, block_size)  # [B, T, R, d]
    R = token.shape[2]
    b = token.view(B, -1, d)  # [B, T*R, d]
    a = head_factors(kv, part, blocks, block_size, row_scale)  # [B, T, R, G]
    qb = torch.matmul(q.view(B, G * M, d), b.transpose(1, 2)).view(B, G, M, -1, R)
    a = a.permute(0, 3, 1, 2).unsqueeze(2)  # [B, G, 1, T, R]
    if R == 1:
        return qb[..., 0] * a[..., 0]
    return (qb * a).sum(-1)


def tile_values(p: torch.Tensor, kv: LayerKV, blocks, block_size, dense: bool = False) -> torch.Tensor:
    """sum_t p[.., t] V[t] for one tile. p: [B, G, H/G, L, T] float32; returns float32 [B, G, H/G, L, d]."""
    B, G, Hg, L, T = p.shape
    if kv.spec.v_factored and not dense:
        token, row_scale = token_tile(kv, "v", blocks, block_size)  # [B, T, R, d]
        R, d = token.shape[2:]
        b = token.view(B, T * R, d)
        a = head_factors(kv, "v", blocks, block_size, row_scale).permute(0, 3, 1, 2)  # [B, G, T, R]
        pa = (p.unsqueeze(-1) * a[:, :, None, None]).to(b.dtype).reshape(B, G * Hg * L, T * R)
        return torch.matmul(pa, b).float().view(B, G, Hg, L, d)
    if dense:
        v, row_scale = rebuild(kv, "v", blocks, block_size), None
    else:
        v, row_scale = plain_tile(kv, "v", blocks, block_size)
    d = v.shape[-1]
    pg = p.transpose(0, 1).reshape(G, B, Hg * L, T)
    if row_scale is not None:
        pg = pg * row_scale.unsqueeze(2)  # [G, B, 1, T]
    return torch.matmul(pg.to(v.dtype), v).float().view(G, B, Hg, L, d).transpose(0, 1)


def plain_prefill(q, kv: LayerKV, table, first_pos, q_pos, limits, window, block_size, scale) -> torch.Tensor:
    """A prefill chunk over a standard cache: its visible keys and values, then the fused SDPA kernel."""
    G = kv.spec.kv_heads
    k = gather_plain(kv.k[0], table, block_size).transpose(0, 1)  # [1, G, T, d]
    v = gather_plain(kv.v[0], table, block_size).transpose(0, 1)
    mask = key_visibility(first_pos, 0, k.shape[2], q_pos, limits, window)[:, None]  # [1, 1, L, T]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != G)
