"""One metadata object per forward step: where each new token goes and what each query may see.

A step packs the new tokens of B sequences into one flat batch of N tokens. Sequences with a single new
token (decodes) come first, so attention handles them together; the others (prefill chunks) follow. For
every cache pool the metadata holds, as flat integer tensors built with vectorized operations and copied to
the device once:
    slot_mapping [N]       the cache slot each new token's keys and values are written to
    block_tables [B, nb]   the blocks a sequence's queries can see (a sliding window's first block first)
    first_key_pos [B]      the position of the first slot of block_tables[:, 0]
Per sequence: query_start [B + 1], the offsets of its new tokens in the batch (on the host and the device).
Per token: positions [N] and limits [N], the last key position a query may attend to: its own position, or
for an image token the last token of its image (an image sees all of itself, later images never); and
image_mask [N], True where an image's features replace the token. The mask comes from each sequence's own
image spans, never from token ids, so a stray image token id elsewhere in the batch cannot shift the features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .backends import AttentionBackend
    from .kv_cache import KVCache

ALIGN_ELEMENTS = 2  # int64 elements per 16 bytes: where each metadata array starts in the step's device buffer


@dataclass
class PoolMetadata:
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    first_key_pos: torch.Tensor
    num_blocks: list[int]  # host copy: visible blocks per sequence
    window: int | None
    block_size: int

    def decode_blocks(self, num_decodes: int) -> int:
        """Columns of block_tables the decode sequences use."""
        return max(self.num_blocks[:num_decodes], default=0)


@dataclass
class AttentionMetadata:
    kv: KVCache
    backend: AttentionBackend
    positions: torch.Tensor  # [N]
    limits: torch.Tensor  # [N]
    query_start: list[int]  # host: [B + 1] offsets of each sequence's tokens in the batch
    num_decodes: int  # the first num_decodes sequences have one new token each
    logits_indices: torch.Tensor  # rows of the batch whose logits are wanted
    pools: list[PoolMetadata]
    image_mask: torch.Tensor | None = None  # [N] bool: the tokens an image's features replace; None: no image
    seq_starts: torch.Tensor | None = None  # query_start on the device (kernels that take many sequences)

    @property
    def num_seqs(self) -> int:
        return len(self.query_start) - 1

    def prefill_seqs(self) -> range:
        return range(self.num_decodes, self.num_seqs)


def image_spans(token_ids: Sequence[int], image_token_id: int | None) -> list[tuple[int, int]]:
    """[start, end) of every run of image soft tokens: each run is one image."""
    spans, start = [], None
    for pos, token in enumerate([*token_ids, None]):
        if token == image_token_id and image_token_id is not None:
            start = pos if start is None else start
        elif start is not None:
            spans.append((start, pos))
            start = None
    return spans


def build_metadata(
    kv: KVCache,
    backend: AttentionBackend,
    starts: Sequence[int],
    lengths: Sequence[int],
    block_tables: Sequence[Sequence[Sequence[int]]],
    logits_indices: Sequence[int],
    images: Sequence[Sequence[tuple[int, int]]] | None = None,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for sequences whose tokens [starts[i], starts[i] + lengths[i]) are computed in this step.

    block_tables[p][i] is sequence i's block table in pool p (entries before its window may be freed: < 0).
    images[i] lists the [a, b) positions of the images among sequence i's new tokens.
    """
    starts_np = np.asarray(starts, dtype=np.int64)
    lengths_np = np.asarray(lengths, dtype=np.int64)
    B = len(lengths_np)
    query_start = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(lengths_np, out=query_start[1:])
    seq_of_token = np.repeat(np.arange(B), lengths_np)
    positions = starts_np[seq_of_token] + np.arange(query_start[-1]) - query_start[:-1][seq_of_token]
    limits = positions.copy()
    is_image = np.zeros(len(positions), dtype=np.int64)
    for i, spans in enumerate(images or []):
        for a, b in spans:
            lo = query_start[i] + a - starts_np[i]
            limits[lo : lo + b - a] = b - 1
            is_image[lo : lo + b - a] = 1
    num_decodes = int(np.argmin(np.append(lengths_np, 0) == 1))  # leading sequences with one token

    host = {"positions": positions, "limits": limits, "logits": np.asarray(logits_indices, dtype=np.int64),
            "query_start": query_start}
    if is_image.any():
        host["image"] = is_image
    pool_hosts = [
        _pool_arrays(pool.window, kv.block_size, tables, starts_np, lengths_np, positions, seq_of_token)
        for pool, tables in zip(kv.pools, block_tables)
    ]
    for p, arrays in enumerate(pool_hosts):
        host |= {f"{p}.{name}": a for name, a in arrays.items() if name != "num_blocks"}
    dev = _to_device(host, device)
    pools = [
        PoolMetadata(dev[f"{p}.slots"], dev[f"{p}.tables"], dev[f"{p}.first"], arrays["num_blocks"].tolist(),
                     pool.window, kv.block_size)
        for p, (pool, arrays) in enumerate(zip(kv.pools, pool_hosts))
    ]
    image_mask = dev["image"].bool() if "image" in dev else None
    return AttentionMetadata(kv, backend, dev["positions"], dev["limits"], query_start.tolist(), num_decodes,
                             dev["logits"], pools, image_mask, dev["query_start"])


def _pool_arrays(window, block_size, tables, starts, lengths, positions, seq_of_token) -> dict[str, np.ndarray]:
    """A pool's block tables, cut to the blocks each sequence's queries can see, and the new tokens' slots."""
    ends = starts + lengths
    if window is None:
        first_block = np.zeros_like(starts)
    else:
        first_block = np.maximum(starts - window + 1, 0) // block_size
    num_blocks = -(-ends // block_size) - first_block
    table = np.zeros((len(starts), max(1, int(num_blocks.max(initial=0)))), dtype=np.int64)
    for i, (lo, n) in enumerate(zip(first_block.tolist(), num_blocks.tolist())):
        table[i, :n] = tables[i][lo : lo + n]
    if (table < 0).any():
        raise ValueError("a block table reaches a block its sliding window already freed")
    column = positions // block_size - first_block[seq_of_token]
    slots = table[seq_of_token, column] * block_size + positions % block_size
    return {"slots": slots, "tables": table, "first": first_block * block_size, "num_blocks": num_blocks}


def _to_device(arrays: dict[str, np.ndarray], device: torch.device | str) -> dict[str, torch.Tensor]:
    """All integer arrays in one buffer and one host-to-device copy. Each array starts a multiple of 16 bytes
    into the buffer: Triton compiles a kernel per pointer alignment, so unaligned views would compile new
    variants of every kernel as the arrays' sizes change from step to step."""
    padded = [np.pad(a.reshape(-1), (0, -a.size % ALIGN_ELEMENTS)) for a in arrays.values()]
    buffer = torch.from_numpy(np.concatenate(padded))
    if torch.device(device).type == "cuda":
        buffer = buffer.pin_memory().to(device, non_blocking=True)
    out, offset = {}, 0
    for (name, a), piece in zip(arrays.items(), padded):
        out[name] = buffer[offset : offset + a.size].view(a.shape)
        offset += piece.size
    return out
