"""Decode steps replayed from CUDA graphs, one graph per batch size.

A decode step of a small model is dozens of short kernels per layer; launched one by one from Python, the
launches, not the GPU, set the pace. A CUDA graph records one step's launches once and replays them with a
single call. A graph replays fixed addresses and fixed grids, so everything a step reads lives in static
buffers that each step overwrites:
    input_ids, positions, limits [max size]
    per pool: slot_mapping [max size], block_tables [max size, widest table], first_key_pos [max size]
    logits [max size, vocab], which every graph writes its step's logits into (a graph's own output would stay
    allocated in the shared pool for as long as the graph lives, one [size, vocab] tensor per size)
and the grids depend on the batch size alone: every table is as wide as the longest sequence's can be, and
the decode kernel splits each sequence's own keys over a split count fixed by that width (triton_decode.py).

A step of B decodes pads up to the next captured size: the padding rows are position 0 of a sequence whose
table holds only the pad block, a block no sequence owns, so they write and read that block and nothing
else; their logits are dropped. Steps with a prefill chunk, images or more sequences than the largest size
(at most MAX_GRAPH_BATCH) run eagerly. Graphs are captured in the model runner only, after the cache is
allocated, largest first, sharing one memory pool. Without capture (a CPU) the same padded steps run eagerly
over the static buffers.
"""

from __future__ import annotations

import torch

from tpa_model.cache.kv_cache import KVCache, max_blocks_per_seq
from tpa_model.cache.metadata import AttentionMetadata, PoolMetadata
from tpa_model.model.decoder import GemmaTPAModel

# Larger decode batches run eagerly: launches no longer set their pace there.
MAX_GRAPH_BATCH = 256


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs or MAX_GRAPH_BATCH (the last size is that bound itself)."""
    largest = min(max_num_seqs, MAX_GRAPH_BATCH)
    sizes = {1, 2, 4, *range(8, largest + 8, 8)}
    return sorted({min(s, largest) for s in sizes})


class DecodeGraphs:
    def __init__(self, model: GemmaTPAModel, kv: KVCache, backend, pad_blocks: dict[str, int], max_model_len: int,
                 max_num_seqs: int, capture: bool):
        self.model = model
        self.sizes = graph_batch_sizes(max_num_seqs)
        n, device, block_size = self.sizes[-1], model.device, kv.block_size

        def static(*shape, fill=0):
            return torch.full(shape, fill, dtype=torch.long, device=device)

        self.input_ids, self.positions, self.limits = static(n), static(n), static(n)
        self.pad_blocks = [pad_blocks[p.name] for p in kv.pools]
        self.pools = []  # one static PoolMetadata per cache pool, over n rows
        for pool, pad in zip(kv.pools, self.pad_blocks):
            width = min(max_blocks_per_seq(max_model_len, block_size, pool.window), pad)  # pad: the pool's size
            self.pools.append(PoolMetadata(static(n, fill=pad * block_size), static(n, width, fill=pad), static(n),
                                           [width] * n, pool.window, block_size))
        rows = torch.arange(n, device=device)
        self.metadata = {size: self._metadata(kv, backend, size, rows) for size in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits = torch.empty(n, model.config.vocab_size, dtype=model.dtype, device=device)
        if capture:
            self.capture()

    def _metadata(self, kv: KVCache, backend, size: int, rows: torch.Tensor) -> AttentionMetadata:
        """A decode step of `size` sequences over the first `size` rows of the static buffers."""
        pools = [PoolMetadata(p.slot_mapping[:size], p.block_tables[:size], p.first_key_pos[:size],
                              p.num_blocks[:size], p.window, p.block_size) for p in self.pools]
        return AttentionMetadata(kv, backend, self.positions[:size], self.limits[:size], list(range(size + 1)),
                                 size, rows[:size], pools)

    def forward(self, size: int) -> torch.Tensor:
        """The model over the static buffers' first `size` rows, its logits written to self.logits[:size]."""
        logits = self.logits[:size]
        logits.copy_(self.model(self.input_ids[:size], self.positions[:size], self.metadata[size]))
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        """One graph per size, largest first, all in one memory pool. Each size runs once eagerly before its
        capture, so the Triton kernels are compiled and loaded outside it."""
        pool = None
        for size in reversed(self.sizes):
            self.forward(size)
            torch.cuda.synchronize(self.model.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.model.device)

    def can_run(self, meta: AttentionMetadata, pixel_values: torch.Tensor | None) -> bool:
        """A decode-only step without images that the static buffers hold."""
        return (pixel_values is None and meta.num_decodes == meta.num_seqs <= self.sizes[-1]
                and all(p.block_tables.shape[1] <= s.block_tables.shape[1] for p, s in zip(meta.pools, self.pools)))

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The logits of meta.logits_indices for a step can_run accepts: copied into the static buffers (the
        padding rows reset to the pad block), replayed, read back."""
        B = meta.num_seqs
        size = next(s for s in self.sizes if s >= B)
        for buffer, values in ((self.input_ids, input_ids), (self.positions, meta.positions),
                               (self.limits, meta.limits)):
            buffer[:B].copy_(values)
            buffer[B:size].zero_()
        for static, pool, pad in zip(self.pools, meta.pools, self.pad_blocks):
            static.slot_mapping[:B].copy_(pool.slot_mapping)
            static.slot_mapping[B:size].fill_(pad * static.block_size)
            static.block_tables[:B, : pool.block_tables.shape[1]].copy_(pool.block_tables)
            static.block_tables[B:size].fill_(pad)
            static.first_key_pos[:B].copy_(pool.first_key_pos)
            static.first_key_pos[B:size].zero_()
        if size in self.graphs:
            self.graphs[size].replay()
            logits = self.logits[:size]
        else:
            logits = self.forward(size)
        return logits[meta.logits_indices]
