"""What each layer caches per token, and the paged storage that holds it.

Every layer declares a CacheSpec: its keys and values are each stored either plain (G x d numbers per token,
as in a standard GQA cache) or as TPA factors of rank R (R x G head factors and R x d token factors). A part
at full rank (R = G) is always stored plain: the factors would cost R (G + d) > G d numbers for the same
keys. Layers with the same window share one block pool (one block table per sequence, whatever each layer's
ranks); a sliding-window pool only keeps the blocks its window can still see.

Storage per layer, one slot per cached token (slot = block * block_size + offset):
    plain part     [G, slots, d]                  (head-major: a tile of one head's keys is contiguous)
    factored part  head [slots, R, G], token [slots, R, d]
Keys and values may each be stored in 8 or 4 bits (quantization.py): the plain rows or the token factors
are then stored quantized, with their float16 scales beside them in the same slots ([G, slots, groups] or
[slots, R, groups]); head factors stay in the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..model.config import TextConfig
from .metadata import build_metadata
from .quantization import AUTO, SCALE_DTYPE, KVCacheDtype, is_quantized, num_groups, storage_dtype, stored_width

if TYPE_CHECKING:
    from .backends import AttentionBackend


@dataclass(frozen=True)
class CacheSpec:
    kv_heads: int
    head_dim: int
    k_rank: int
    v_rank: int
    window: int | None  # sliding window in tokens; None for global layers
    dtype: torch.dtype  # the model's: what attention computes in, and what "auto" parts store
    k_cache_dtype: str = "auto"  # how keys are stored: auto, int8, fp8_e4m3 or int4 (quantization.py)
    v_cache_dtype: str = "auto"

    @property
    def k_factored(self) -> bool:
        return self.k_rank < self.kv_heads

    @property
    def v_factored(self) -> bool:
        return self.v_rank < self.kv_heads

    @property
    def quantized(self) -> bool:
        return is_quantized(self.k_cache_dtype) or is_quantized(self.v_cache_dtype)

    def cache_dtype(self, part: str) -> str:
        """How part 'k' or 'v' is stored."""
        return self.k_cache_dtype if part == "k" else self.v_cache_dtype

    @property
    def layout(self) -> str:
        shape = "standard" if not (self.k_factored or self.v_factored) else f"factors k{self.k_rank} v{self.v_rank}"
        if not self.quantized:
            return shape
        stored = KVCacheDtype(self.k_cache_dtype, self.v_cache_dtype).name()
        return f"{shape} ({stored})"

    def part_shapes(self) -> list[tuple[int, ...]]:
        """Per-token shapes of the stored tensors, keys then values."""
        G, d = self.kv_heads, self.head_dim
        shapes = []
        for rank, factored in ((self.k_rank, self.k_factored), (self.v_rank, self.v_factored)):
            shapes += [(rank, G), (rank, d)] if factored else [(G, d)]
        return shapes


def layer_cache_specs(config: TextConfig, dtype: torch.dtype, cache_dtype: KVCacheDtype = AUTO) -> list[CacheSpec]:
    """The cache spec of every layer of a model with this config, keys and values stored as cache_dtype says."""
    specs = []
    for layer in range(config.num_hidden_layers):
        k_rank, v_rank = config.layer_ranks(layer)
        window = config.sliding_window if config.is_sliding(layer) else None
        specs.append(CacheSpec(config.num_key_value_heads, config.head_dim, k_rank, v_rank, window, dtype,
                               cache_dtype.k, cache_dtype.v))
    return specs


def standard_specs(specs: list[CacheSpec], window_freeing: bool = True, cache_dtype: KVCacheDtype = AUTO,
                   dtype: torch.dtype | None = None) -> list[CacheSpec]:
    """The same layers with a standard GQA cache (K and V plain), for comparisons: stored as cache_dtype says,
    in `dtype` where that is auto (default: the layers' own)."""
    return [
        CacheSpec(s.kv_heads, s.head_dim, s.kv_heads, s.kv_heads, s.window if window_freeing else None,
                  dtype or s.dtype, cache_dtype.k, cache_dtype.v)
        for s in specs
    ]


def max_blocks_per_seq(num_tokens: int, block_size: int, window: int | None, chunk: int = 1) -> int:
    """The most blocks of one pool that a sequence of num_tokens holds at once, computing at most `chunk`
    tokens per step. Global pools keep every block; a windowed pool keeps the blocks that the step's queries
    can see: the window before the chunk's first token, plus the chunk."""
    every_block = math.ceil(num_tokens / block_size)
    if window is None:
        return every_block
    span = window - 1 + max(1, min(chunk, num_tokens))  # tokens from the first visible key to the chunk's end
    return min(every_block, (span - 2) // block_size + 2)  # a span of n tokens touches at most this many blocks


@dataclass
class Pool:
    """Layers that share one block pool and one block table per sequence: the layers with the same window.
    Their specs may differ (ranks per layer): each layer stores its own bytes per slot."""

    name: str
    window: int | None
    layers: list[int]
    layouts: list[str]  # the distinct layouts of its layers, in layer order


def group_pools(specs: list[CacheSpec]) -> list[Pool]:
    """One pool per distinct window, in layer order: 'global' (no window) and 'sliding', or, where a model
    has several windows, 'sliding<W>'."""
    pools: dict[int | None, Pool] = {}
    for layer, spec in enumerate(specs):
        pool = pools.setdefault(spec.window, Pool("", spec.window, [], []))
        pool.layers.append(layer)
        if spec.layout not in pool.layouts:
            pool.layouts.append(spec.layout)
    windowed = [w for w in pools if w is not None]
    for window, pool in pools.items():
        pool.name = "global" if window is None else "sliding" if len(windowed) == 1 else f"sliding{window}"
    return list(pools.values())


class LayerKV:
    """One layer's cached keys and values in its pool's slots; each part plain or factored, and stored in the
    model's dtype or quantized. k and v hold the data ((store,) or (head, token)); k_scale and v_scale the
    scales of a quantized part's rows (plain rows or token factors), else None."""

    def __init__(self, spec: CacheSpec, num_slots: int, device: torch.device | str):
        self.spec = spec
        G, d = spec.kv_heads, spec.head_dim

        def part(rank: int, factored: bool, kind: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
            rows = (num_slots, rank) if factored else (G, num_slots)
            data = torch.zeros(*rows, stored_width(kind, d), dtype=storage_dtype(kind, spec.dtype), device=device)
            scale = None
            if is_quantized(kind):
                scale = torch.zeros(*rows, num_groups(kind, d), dtype=SCALE_DTYPE, device=device)
            if factored:
                return (torch.zeros(num_slots, rank, G, dtype=spec.dtype, device=device), data), scale
            return (data,), scale

        self.k, self.k_scale = part(spec.k_rank, spec.k_factored, spec.k_cache_dtype)
        self.v, self.v_scale = part(spec.v_rank, spec.v_factored, spec.v_cache_dtype)

    def stored(self, part: str) -> tuple[torch.Tensor, ...]:
        """Part 'k' or 'v': (store,) or (head factors, token factors)."""
        return self.k if part == "k" else self.v

    def scale(self, part: str) -> torch.Tensor | None:
        return self.k_scale if part == "k" else self.v_scale

    def tensors(self) -> tuple[torch.Tensor, ...]:
        scales = tuple(t for t in (self.k_scale, self.v_scale) if t is not None)
        return self.k + self.v + scales

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class KVCache:
    """Every layer's storage, pool by pool: what the attention backends write into and read from."""

    def __init__(
        self,
        specs: list[CacheSpec],
        num_blocks: dict[str, int],
        block_size: int,
        device: torch.device | str,
    ):
        self.specs = specs
        self.block_size = block_size
        self.pools = group_pools(specs)
        missing = [p.name for p in self.pools if p.name not in num_blocks]
        if missing:
            raise ValueError(f"no block count for cache pool(s) {missing}; pools are {self.pool_names}")
        self.num_blocks = {p.name: int(num_blocks[p.name]) for p in self.pools}
        self.pool_of_layer = [0] * len(specs)
        for i, pool in enumerate(self.pools):
            for layer in pool.layers:
                self.pool_of_layer[layer] = i
        self.layers = [
            LayerKV(spec, self.num_blocks[self.pools[self.pool_of_layer[i]].name] * block_size, device)
            for i, spec in enumerate(specs)
        ]

    @property
    def pool_names(self) -> list[str]:
        return [p.name for p in self.pools]

    def block_bytes(self, pool: str) -> int:
        """Measured from the allocated tensors: one block of this pool, all of its layers."""
        index = self.pool_names.index(pool)
        return sum(self.layers[i].nbytes for i in self.pools[index].layers) // max(1, self.num_blocks[pool])

    def total_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


def pool_block_bytes(specs: list[CacheSpec], block_size: int) -> dict[str, int]:
    """Bytes of one block of every pool, read off tensors allocated on the meta device."""
    pools = group_pools(specs)
    cache = KVCache(specs, {p.name: 1 for p in pools}, block_size, "meta")
    return {p.name: cache.block_bytes(p.name) for p in pools}


class ContiguousKVCache:
    """B sequences that advance together, each in one block of max_len slots: the paged cache with trivial
    block tables. generate(), conversion and the tests run the model's one forward over it. Its builder
    chooses the attention backend (the contiguous path uses the reference: backends.default_backend)."""

    def __init__(
        self,
        config: TextConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        *,
        backend: AttentionBackend,
        cache_dtype: KVCacheDtype = AUTO,
    ):
        specs = layer_cache_specs(config, dtype, cache_dtype)
        self.kv = KVCache(specs, {p.name: batch_size for p in group_pools(specs)}, max_len, device)
        self.batch_size, self.max_len, self.seq_len = batch_size, max_len, 0
        self.device = device
        self.backend = backend

    def step(self, length: int, last_only: bool = False, images: list[list[tuple[int, int]]] | None = None):
        """Metadata for the next `length` tokens of every sequence (logits of all of them, or of the last).
        images[b] are [a, b) spans relative to these new tokens."""
        start, B = self.seq_len, self.batch_size
        if start + length > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; cannot store up to position {start + length}")
        tables = [[[b] for b in range(B)] for _ in self.kv.pools]
        rows = [(b + 1) * length - 1 for b in range(B)] if last_only else list(range(B * length))
        spans = [[(a + start, e + start) for a, e in row] for row in images] if images else None
        meta = build_metadata(self.kv, self.backend, [start] * B, [length] * B, tables, rows, spans, self.device)
        self.seq_len += length
        return meta
