"""How many long sessions a cache holds, next to a standard Gemma 3 cache in the same memory.

Block bytes are read off allocated tensors (on the meta device when sizing a model that is not loaded),
never from a closed formula. Pools are sized for concurrent sessions of one length, so the figure reported
is the number of such sessions the engine really admits at once; the same planning is applied to the
standard layout, so the two are compared like with like.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..model.config import TextConfig
from .kv_cache import CacheSpec, group_pools, layer_cache_specs, max_blocks_per_seq, pool_block_bytes, standard_specs
from .quantization import AUTO, KVCacheDtype


@dataclass
class CacheLayout:
    name: str
    specs: list[CacheSpec]
    block_size: int

    @cached_property
    def block_bytes(self) -> dict[str, int]:
        """Bytes of one block of each pool, all of its layers."""
        return pool_block_bytes(self.specs, self.block_size)

    @cached_property
    def windows(self) -> dict[str, int | None]:
        return {p.name: p.window for p in group_pools(self.specs)}

    def session_blocks(self, num_tokens: int, chunk: int = 1) -> dict[str, int]:
        """Blocks one session of num_tokens holds at its longest, per pool."""
        return {p: max_blocks_per_seq(num_tokens, self.block_size, w, chunk) for p, w in self.windows.items()}

    def session_bytes(self, num_tokens: int) -> int:
        return sum(n * self.block_bytes[p] for p, n in self.session_blocks(num_tokens).items())

    def plan(
        self, memory_bytes: int, session_len: int, chunk: int, max_sessions: int | None = None
    ) -> tuple[dict[str, int], int]:
        """(blocks per pool, sessions): as many sessions of session_len as fit in memory_bytes (at most
        max_sessions: more could never run at once), each holding its blocks at once, plus one prefill
        chunk's extra blocks in the windowed pools."""
        per_session = self.session_blocks(session_len)
        extra = {p: n - per_session[p] for p, n in self.session_blocks(session_len, chunk).items()}
        extra_bytes = sum(n * self.block_bytes[p] for p, n in extra.items())
        sessions = max(0, (memory_bytes - extra_bytes) // self.session_bytes(session_len))
        if max_sessions is not None:
            sessions = min(sessions, max_sessions)
        return {p: sessions * per_session[p] + extra[p] for p in per_session}, int(sessions)


def tpa_layout(config: TextConfig, dtype: torch.dtype, block_size: int = 16,
               cache_dtype: KVCacheDtype = AUTO) -> CacheLayout:
    specs = layer_cache_specs(config, dtype, cache_dtype)
    layouts = sorted({s.layout for s in specs})
    return CacheLayout("TPA " + " / ".join(layouts), specs, block_size)


def standard_layout(
    config: TextConfig, dtype: torch.dtype, block_size: int = 16, window_freeing: bool = True,
    cache_dtype: KVCacheDtype = AUTO,
) -> CacheLayout:
    """A standard paged GQA cache: K and V, [block_size, kv_heads, head_dim] per layer and block."""
    specs = standard_specs(layer_cache_specs(config, dtype), window_freeing, cache_dtype)
    name = "standard GQA" + (" (window freeing)" if window_freeing else " (no window freeing)")
    if cache_dtype.quantized:
        name += f", {cache_dtype.name()}"
    return CacheLayout(name, specs, block_size)


def sessions_in_memory(layout: CacheLayout, memory_bytes: int, num_tokens: int, chunk: int = 1) -> int:
    return layout.plan(memory_bytes, num_tokens, chunk)[1]


@dataclass
class CapacityReport:
    cache_bytes: int
    session_len: int
    sessions: int  # sessions of session_len the pools hold at once
    standard_sessions: int  # the same for a standard cache in the model's dtype planned in the same memory
    max_num_seqs: int
    bytes_per_token: float  # one session of session_len, all layers
    bytes_per_token_standard: float
    pools: dict[str, str]  # pool -> what its layers store and how many blocks it has
    model_dtype: str = "float32"
    bf16_sessions: int | None = None  # a standard bfloat16 cache in the same memory (None: the model is bf16)

    @property
    def engine_limit(self) -> int:
        """Sessions of session_len the engine runs at once: what the pools hold, and its sequence limit."""
        return min(self.sessions, self.max_num_seqs)

    def format(self) -> str:
        pools = "; ".join(f"{name}: {desc}" for name, desc in self.pools.items())
        bf16 = ""
        if self.bf16_sessions is not None:
            bf16 = f" and {self.bf16_sessions} for a bfloat16 one (x{ratio(self.sessions, self.bf16_sessions)})"
        return (
            f"KV cache: {self.cache_bytes / 2**30:.3f} GiB ({pools}); it holds {self.sessions} sessions of "
            f"{self.session_len} tokens at once, against {self.standard_sessions} for a standard GQA cache "
            f"in {self.model_dtype} in the same memory (x{ratio(self.sessions, self.standard_sessions)}; "
            f"{self.bytes_per_token:.0f} vs {self.bytes_per_token_standard:.0f} bytes per token){bf16}; "
            f"with --max-num-seqs {self.max_num_seqs} the engine runs up to {self.engine_limit} such sessions at once"
        )


def ratio(sessions: int, baseline: int) -> str:
    return f"{sessions / baseline:.2f}" if baseline else "inf"


def capacity_report(
    layout: CacheLayout, num_blocks: dict[str, int], session_len: int, chunk: int, max_num_seqs: int
) -> CapacityReport:
    """Capacity of pools of these sizes, next to a standard cache planned in the same memory."""
    total = sum(num_blocks[p] * layout.block_bytes[p] for p in num_blocks)
    need = layout.session_blocks(session_len)
    extra = {p: n - need[p] for p, n in layout.session_blocks(session_len, chunk).items()}
    sessions = min((num_blocks[p] - extra[p]) // need[p] for p in need)
    standard = CacheLayout("standard", standard_specs(layout.specs), layout.block_size)
    model_dtype = layout.specs[0].dtype
    bf16 = None
    if model_dtype != torch.bfloat16:
        bf16_layout = CacheLayout("standard bf16", standard_specs(layout.specs, dtype=torch.bfloat16),
                                  layout.block_size)
        bf16 = sessions_in_memory(bf16_layout, total, session_len, chunk)
    pools = {
        p.name: f"{p.layouts[0] if len(p.layouts) == 1 else f'{len(p.layouts)} layouts (ranks per layer)'}, "
                f"{'window ' + str(p.window) if p.window else 'full context'}, "
                f"{len(p.layers)} layer{'s' if len(p.layers) > 1 else ''}, {num_blocks[p.name]} blocks"
        for p in group_pools(layout.specs)
    }
    return CapacityReport(
        cache_bytes=total,
        session_len=session_len,
        sessions=max(0, sessions),
        standard_sessions=sessions_in_memory(standard, total, session_len, chunk),
        max_num_seqs=max_num_seqs,
        bytes_per_token=layout.session_bytes(session_len) / session_len,
        bytes_per_token_standard=standard.session_bytes(session_len) / session_len,
        pools=pools,
        model_dtype=str(model_dtype).removeprefix("torch."),
        bf16_sessions=bf16,
    )
