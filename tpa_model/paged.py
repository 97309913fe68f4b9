"""The paged factor cache: factor storage in fixed-size blocks, and attention through block tables.

Storage is split in two groups of layers: global layers and sliding-window layers, each with its own block
pool, because sliding layers only keep the blocks of the last window. The block bookkeeping (which block
belongs to which sequence) lives with the scheduler; this module only sees block tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import Factors, attention_masks, dense_attention, factor_attention
from .config import GLOBAL, SLIDING, TextConfig

GROUPS = (GLOBAL, SLIDING)


class PagedFactorCache:
    """Per layer, the four factor tensors of all blocks of its group: [num_blocks * block_size, R, width]."""

    def __init__(
        self,
        config: TextConfig,
        num_blocks: dict[str, int],
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.config = config
        self.block_size = block_size
        self.num_blocks = dict(num_blocks)
        self.group_of_layer = [GLOBAL if t == GLOBAL else SLIDING for t in config.layer_types]
        self.layers = []
        for group in self.group_of_layer:
            slots = self.num_blocks[group] * block_size
            tensors = [torch.zeros(slots, r, w, dtype=dtype, device=device) for r, w in config.factor_shapes()]
            self.layers.append(Factors(*tensors))

    def bytes_per_block(self, group: str) -> int:
        """Measured from the allocated tensors: one block of this group, all of its layers."""
        layers = [f for f, g in zip(self.layers, self.group_of_layer) if g == group]
        return sum(f.nbytes // self.num_blocks[group] for f in layers)

    def total_bytes(self) -> int:
        return sum(f.nbytes for f in self.layers)


@dataclass
class SequenceChunk:
    """One sequence's part of a packed forward: tokens [start, start + length) are new."""

    start: int
    length: int
    block_tables: dict[str, list[int]]  # group -> block table (entries < 0: dropped by the window)
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # [a, b) positions of images in the chunk


class PagedContext:
    """Everything the attention layers need for one packed forward over the paged cache."""

    def __init__(self, cache: PagedFactorCache, chunks: list[SequenceChunk], device: torch.device | str):
        self.cache = cache
        self.chunks = chunks
        cfg, bs = cache.config, cache.block_size
        self.windows = {GLOBAL: None, SLIDING: cfg.sliding_window}
        self.positions = torch.cat([torch.arange(c.start, c.start + c.length) for c in chunks]).to(device)
        self.offsets = [0]
        for c in chunks:
            self.offsets.append(self.offsets[-1] + c.length)

        def slots(table: list[int], lo: int, hi: int) -> torch.Tensor:
            """Cache slots of positions [lo, hi) through a block table."""
            positions = torch.arange(lo, hi)
            blocks = torch.tensor(table, dtype=torch.long)[positions // bs]
            assert bool((blocks >= 0).all()), f"positions [{lo}, {hi}) reach a block the window already dropped"
            return (blocks * bs + positions % bs).to(device)

        self.new_slots, self.key_slots, self.key_pos = {}, {}, {}
        for group, window in self.windows.items():
            self.new_slots[group] = torch.cat(
                [slots(c.block_tables[group], c.start, c.start + c.length) for c in chunks]
            )
            self.key_slots[group], self.key_pos[group] = [], []
            for c in chunks:
                lo = 0 if window is None else max(0, c.start - window + 1)
                self.key_slots[group].append(slots(c.block_tables[group], lo, c.start + c.length))
                self.key_pos[group].append(torch.arange(lo, c.start + c.length, device=device))
        self.decode = [i for i, c in enumerate(chunks) if c.length == 1]
        self.prefill = [i for i, c in enumerate(chunks) if c.length > 1]
        # what attention needs is the same for every layer of a group: build it once per forward
        self.decode_rows = torch.tensor([self.offsets[i] for i in self.decode], dtype=torch.long, device=device)
        self.decode_index = {g: self._padded_keys(g, device) for g in GROUPS} if self.decode else {}
        self.prefill_masks = {g: [self._prefill_mask(i, g) for i in self.prefill] for g in GROUPS}

    def _padded_keys(self, group: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode sequences' key slots padded to one length, and the mask that hides the padding."""
        lengths = [len(self.key_slots[group][i]) for i in self.decode]
        T = max(lengths)
        index = torch.zeros(len(self.decode), T, dtype=torch.long, device=device)
        mask = torch.zeros(len(self.decode), 1, 1, T, dtype=torch.bool, device=device)
        for row, (i, n) in enumerate(zip(self.decode, lengths)):
            index[row, :n] = self.key_slots[group][i]
            mask[row, 0, 0, :n] = True
        return index, mask

    def _prefill_mask(self, i: int, group: str) -> torch.Tensor:
        """Causal (and windowed on sliding layers) mask of a prefill chunk; the tokens of one image see each
        other both ways (the scheduler never splits an image)."""
        q_pos = self.positions[self.offsets[i] : self.offsets[i + 1]]
        k_pos = self.key_pos[group][i]
        images = None
        if self.chunks[i].image_spans:
            images = torch.zeros(len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
            for a, b in self.chunks[i].image_spans:
                images |= ((q_pos >= a) & (q_pos < b))[:, None] & ((k_pos >= a) & (k_pos < b))[None, :]
            images = images[None, None]
        global_mask, sliding_mask = attention_masks(q_pos, k_pos, self.cache.config.sliding_window, images)
        return sliding_mask if group == SLIDING else global_mask

    def attend(self, layer: int, q: torch.Tensor, new: Factors, mask, scale: float) -> torch.Tensor:
        """q: [1, H, N, d] for the N packed new tokens; new: their factors [1, N, R, *]. Returns [1, H, N, d]."""
        group = self.cache.group_of_layer[layer]
        store = self.cache.layers[layer]
        for buf, t in zip(store.tensors(), new.tensors()):
            buf.index_copy_(0, self.new_slots[group], t[0])
        out = torch.empty_like(q)
        if self.decode:
            index, pad_mask = self.decode_index[group]
            rows = self.decode_rows
            q_dec = q[0, :, rows].transpose(0, 1).unsqueeze(2)  # [B, H, 1, d]
            out[0, :, rows] = factor_attention(q_dec, store.select(index), pad_mask, scale)[:, :, 0].transpose(0, 1)
        for i, mask in zip(self.prefill, self.prefill_masks[group]):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            k, v = store.select(self.key_slots[group][i][None]).materialize()
            out[:, :, lo:hi] = dense_attention(q[:, :, lo:hi], k, v, mask, scale)
        return out
