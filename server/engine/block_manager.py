"""Block bookkeeping for the paged KV cache: allocation, reference counts, prefix sharing, window freeing.

Layers with the same cache spec share a pool, and each pool has its own block table per sequence. A global
pool keeps every block of a sequence; a sliding-window pool only keeps the blocks that a future query can
still see, and hands the rest back while decoding goes on.

Full blocks are identified by a chained SHA-256 digest of their tokens (and everything before them), so
requests that share a prompt prefix share its blocks, and no crafted prompt can collide with another's.
A freed block keeps its digest until it is reused, so a later request can still hit it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

FREED = -1  # block-table entry of a block a sliding window has dropped


def block_digest(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The digest of a full block, chained to its parent's: it covers every token up to the block's end."""
    return hashlib.sha256(parent + np.asarray(token_ids, dtype=np.int64).tobytes()).digest()


class BlockPool:
    """Fixed set of block ids with reference counts; unreferenced blocks are reused oldest-freed first."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # evictable, LRU order
        self.hash_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.hits = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        block, _ = self.free.popitem(last=False)
        self._forget(block)
        self.ref_count[block] = 1
        return block

    def lookup(self, block_hash: bytes) -> int | None:
        return self.block_of.get(block_hash)

    def share(self, block: int) -> None:
        """Take a reference to a cached block (live or freed-but-not-yet-reused)."""
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1
        self.hits += 1

    def release(self, block: int) -> None:
        self.ref_count[block] -= 1
        assert self.ref_count[block] >= 0, f"block {block} released twice"
        if self.ref_count[block] == 0:
            self.free[block] = None

    def register(self, block: int, block_hash: bytes) -> None:
        """Mark a full, computed block as holding the tokens behind block_hash."""
        if block_hash in self.block_of or block in self.hash_of:
            return
        self.hash_of[block] = block_hash
        self.block_of[block_hash] = block

    def _forget(self, block: int) -> None:
        old = self.hash_of.pop(block, None)
        if old is not None:
            del self.block_of[old]


class BlockManager:
    """Blocks of one pool for all sequences."""

    def __init__(self, num_blocks: int, block_size: int, window: int | None = None, prefix_caching: bool = True):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.window = window
        self.prefix_caching = prefix_caching
        # per sequence: table[i] is the block holding tokens [i * block_size, (i + 1) * block_size)
        self.tables: dict[str, list[int]] = {}
        self.registered: dict[str, int] = {}  # per sequence: leading blocks already published
        self.first_live: dict[str, int] = {}  # per sequence: blocks before this one are FREED

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    def first_needed_block(self, next_pos: int) -> int:
        """Index of the first block a query at position >= next_pos can still see."""
        if self.window is None:
            return 0
        return max(0, next_pos - self.window + 1) // self.block_size

    def blocks_needed(self, seq_id: str, start: int, end: int) -> int:
        """New blocks to hold tokens [start, end) for a sequence that has its blocks up to `start`."""
        have = len(self.tables.get(seq_id, []))
        need = -(-end // self.block_size)
        lo = self.first_needed_block(start)
        return max(0, need - max(have, lo))

    def can_serve_prefix(self, hashes: list[bytes], n: int) -> bool:
        """Whether this pool holds every block a sequence resuming after n full blocks needs."""
        if not self.prefix_caching:
            return n == 0
        lo = self.first_needed_block(n * self.block_size)
        return all(self.pool.lookup(h) is not None for h in hashes[lo:n])

    def blocks_to_share(self, hashes: list[bytes], n: int) -> int:
        """Cached blocks taking a prefix of n blocks would pull out of the free list (they count as used)."""
        lo = self.first_needed_block(n * self.block_size)
        return sum(self.pool.ref_count[self.pool.lookup(h)] == 0 for h in hashes[lo:n])

    def take_prefix(self, seq_id: str, hashes: list[bytes], n: int) -> None:
        """Start a sequence's table with n cached blocks (FREED where the window never needs them)."""
        lo = self.first_needed_block(n * self.block_size)
        table = []
        for i in range(n):
            if i < lo:
                table.append(FREED)
            else:
                block = self.pool.lookup(hashes[i])
                self.pool.share(block)
                table.append(block)
        self.tables[seq_id] = table

    def extend(self, seq_id: str, start: int, end: int) -> None:
        """Allocate blocks so the sequence can store tokens [start, end). Caller checked blocks_needed."""
        table = self.tables.setdefault(seq_id, [])
        lo = self.first_needed_block(start)
        while len(table) < lo:
            table.append(FREED)
        while len(table) * self.block_size < end:
            table.append(self.pool.allocate())

    def register_full_blocks(self, seq_id: str, hashes: list[bytes], computed: int) -> None:
        """Publish the sequence's full, computed blocks for prefix sharing (the ones not published yet)."""
        if not self.prefix_caching:
            return
        table = self.tables.get(seq_id, [])
        end = min(computed // self.block_size, len(hashes), len(table))
        for i in range(self.registered.get(seq_id, 0), end):
            if table[i] != FREED:
                self.pool.register(table[i], hashes[i])
        self.registered[seq_id] = max(end, self.registered.get(seq_id, 0))

    def slide(self, seq_id: str, next_pos: int) -> None:
        """Free the blocks no query at position >= next_pos can see (sliding-window pools only)."""
        if self.window is None:
            return
        table = self.tables.get(seq_id, [])
        end = min(self.first_needed_block(next_pos), len(table))
        for i in range(self.first_live.get(seq_id, 0), end):
            if table[i] != FREED:
                self.pool.release(table[i])
                table[i] = FREED
        self.first_live[seq_id] = max(end, self.first_live.get(seq_id, 0))

    def free(self, seq_id: str) -> None:
        self.registered.pop(seq_id, None)
        self.first_live.pop(seq_id, None)
        for block in self.tables.pop(seq_id, []):
            if block != FREED:
                self.pool.release(block)

    def live_blocks(self, seq_id: str) -> int:
        return sum(b != FREED for b in self.tables.get(seq_id, []))
