"""How many long sessions fit: the factor cache against a standard Gemma 3 cache in the same memory.

Bytes are read off allocated tensors (on the meta device when sizing a model that is not loaded), never
from a closed formula, so what is reported is what the allocator would really hand out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import GLOBAL, SLIDING, TextConfig
from .paged import PagedFactorCache


@dataclass
class CacheLayout:
    name: str
    block_size: int
    block_bytes: dict[str, int]  # one block of each layer group, all of its layers
    window_freeing: bool  # sliding-window layers keep only the last window's blocks


def tpa_layout(config: TextConfig, dtype: torch.dtype, block_size: int = 16) -> CacheLayout:
    cache = PagedFactorCache(config, {GLOBAL: 1, SLIDING: 1}, block_size, dtype, "meta")
    name = f"TPA k_rank={config.k_rank} v_rank={config.v_rank}"
    return CacheLayout(name, block_size, {g: cache.bytes_per_block(g) for g in (GLOBAL, SLIDING)}, True)


def standard_layout(
    config: TextConfig, dtype: torch.dtype, block_size: int = 16, window_freeing: bool = True
) -> CacheLayout:
    """A standard paged GQA cache: K and V, [block_size, kv_heads, head_dim] per layer and block."""
    block_bytes = {GLOBAL: 0, SLIDING: 0}
    for layer_type in config.layer_types:
        group = GLOBAL if layer_type == GLOBAL else SLIDING
        for _ in ("k", "v"):
            t = torch.empty(block_size, config.num_key_value_heads, config.head_dim, dtype=dtype, device="meta")
            block_bytes[group] += t.numel() * t.element_size()
    name = "standard GQA" + (" (window freeing)" if window_freeing else " (no window freeing)")
    return CacheLayout(name, block_size, block_bytes, window_freeing)


def session_blocks(layout: CacheLayout, config: TextConfig, num_tokens: int) -> dict[str, int]:
    """Blocks one session of num_tokens holds at its longest."""
    blocks = math.ceil(num_tokens / layout.block_size)
    window = math.ceil(config.sliding_window / layout.block_size) + 1
    return {GLOBAL: blocks, SLIDING: min(blocks, window) if layout.window_freeing else blocks}


def session_bytes(layout: CacheLayout, config: TextConfig, num_tokens: int) -> int:
    blocks = session_blocks(layout, config, num_tokens)
    return sum(blocks[g] * layout.block_bytes[g] for g in blocks)


def sessions_in_memory(layout: CacheLayout, config: TextConfig, memory_bytes: int, num_tokens: int) -> int:
    return memory_bytes // session_bytes(layout, config, num_tokens)


def pool_sessions(num_blocks: dict[str, int], layout: CacheLayout, config: TextConfig, num_tokens: int) -> int:
    """Sessions of num_tokens that fit at once in pools of the given sizes."""
    need = session_blocks(layout, config, num_tokens)
    return min(num_blocks[g] // need[g] for g in need if need[g] and layout.block_bytes[g])


@dataclass
class CapacityReport:
    cache_bytes: int
    tokens: int  # tokens of context the global layers' pool holds
    session_len: int
    sessions: int  # sessions of session_len whose factors fit in cache_bytes
    standard_sessions: int  # the same for a standard cache (same dtype, block size and window handling)
    engine_limit: int  # sessions the engine runs at once: its pools and its max_num_seqs
    bytes_per_token_tpa: float
    bytes_per_token_standard: float

    def format(self) -> str:
        ratio = self.sessions / self.standard_sessions if self.standard_sessions else float("inf")
        return (
            f"factor cache: {self.cache_bytes / 2**30:.3f} GiB holding {self.tokens} tokens; this memory fits "
            f"{self.sessions} sessions of {self.session_len} tokens with TPA factors against "
            f"{self.standard_sessions} with a standard Gemma 3 cache (x{ratio:.2f}; "
            f"{self.bytes_per_token_tpa:.0f} vs {self.bytes_per_token_standard:.0f} bytes per token); "
            f"the engine runs up to {self.engine_limit} at once"
        )


def report_for_pools(cache: PagedFactorCache, session_len: int, max_num_seqs: int) -> CapacityReport:
    """Capacity of an allocated paged factor cache, next to a standard cache in the same memory.

    Both layouts' block sizes are read off allocated tensors and counted the same way."""
    config, bs = cache.config, cache.block_size
    dtype = cache.layers[0].a_k.dtype
    tpa = CacheLayout("TPA", bs, {g: cache.bytes_per_block(g) for g in (GLOBAL, SLIDING)}, True)
    std = standard_layout(config, dtype, bs, window_freeing=True)
    total = cache.total_bytes()
    return CapacityReport(
        cache_bytes=total,
        tokens=cache.num_blocks[GLOBAL] * bs,
        session_len=session_len,
        sessions=sessions_in_memory(tpa, config, total, session_len),
        standard_sessions=sessions_in_memory(std, config, total, session_len),
        engine_limit=min(max_num_seqs, pool_sessions(cache.num_blocks, tpa, config, session_len)),
        bytes_per_token_tpa=session_bytes(tpa, config, session_len) / session_len,
        bytes_per_token_standard=session_bytes(std, config, session_len) / session_len,
    )
