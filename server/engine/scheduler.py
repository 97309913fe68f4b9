"""Continuous batching: which sequences run in the next forward, and how many of their tokens.

Each step has a token budget (max_num_batched_tokens) and a cap on running sequences (max_num_seqs).
Running sequences go first, oldest first: decodes take one token, unfinished prefills take a chunk, so a
long prompt never stalls the others. Waiting sequences are admitted while budget, seats and blocks last.
When a running sequence needs a block and none is free, the newest running sequence is preempted by
recompute: its blocks are freed and it goes back to the front of the queue, keeping the tokens it has made.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from tpa_model.cache.kv_cache import max_blocks_per_seq
from tpa_model.sampling import SamplingParams

from .block_manager import BlockManager, block_digest

# A prompt whose tokens are scored (prompt logprobs) is computed in chunks of at most this many tokens: the
# logits of each of a chunk's positions ([tokens, vocab], float32) are held at once.
PROMPT_SCORING_CHUNK = 256

class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrivals = itertools.count()


@dataclass
class ImageInput:
    """One image of a prompt: its soft tokens occupy positions [start, end)."""

    start: int
    end: int
    pixel_values: torch.Tensor  # [3, size, size]
    key: int  # content digest (negative, unlike token ids): prompts share blocks only if their images are equal


@dataclass(eq=False)
class Sequence:
    seq_id: str
    request_id: str
    index: int  # which of the request's n samples
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose factors are in the cache
    num_cached_prompt: int = 0  # of the prompt, tokens served from the prefix cache at admission
    status: Status = Status.WAITING
    finish_reason: str | None = None
    arrival: int = field(default_factory=lambda: next(_arrivals))
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    images: list[ImageInput] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # digests of the full blocks hashed so far
    matcher: Any = None  # llguidance's matcher of a structured output (server/engine/structured.py)
    # (logprob, top (id, logprob) list) of prompt token i + 1 given the tokens before it, for i = 0, 1, ...
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without copying the whole sequence."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:end] + self.output_ids[: max(0, end - n)]

    def block_hashes(self, num_tokens: int, block_size: int) -> list[bytes]:
        """Digests of the full blocks among the first num_tokens tokens. They are kept and extended as the
        sequence grows (its tokens never change), so each block is hashed once."""
        for i in range(len(self.hashes), num_tokens // block_size):
            parent = self.hashes[-1] if self.hashes else b""
            self.hashes.append(block_digest(parent, self.hash_ids(i * block_size, (i + 1) * block_size)))
        return self.hashes[: num_tokens // block_size]

    def hash_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) for prefix hashing, with each image's soft tokens keyed by its content."""
        ids = self.tokens(start, end)
        for image in self.images:
            for pos in range(max(image.start, start), min(image.end, end)):
                ids[pos - start] = image.key
        return ids

    def chunk_length(self, start: int, budget: int) -> int:
        """Tokens to compute from `start`: within the budget, but never ending inside an image (one image's
        tokens attend to each other, so they are computed together, even past the budget)."""
        length = min(self.num_tokens - start, budget)
        for image in self.images:
            if image.start < start + length < image.end:
                length = image.start - start if image.start > start else image.end - start
        return length

    def splits_image(self, pos: int) -> bool:
        return any(image.start < pos < image.end for image in self.images)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def scores_prompt(self) -> bool:
        """This sample computes the request's prompt logprobs (the first of its samples does, for all of them):
        every prompt position's logits are needed, so it takes no cached prefix."""
        return self.params.prompt_logprobs is not None and self.index == 0


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int
    length: int
    block_tables: list[list[int]] = field(default_factory=list)  # per cache pool, filled when scheduled

    @property
    def images(self) -> list[ImageInput]:
        """The images whose soft tokens are computed in this chunk (an image is never split)."""
        return [im for im in self.seq.images if self.start <= im.start and im.end <= self.start + self.length]

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last known token, so its logits give the next token."""
        return self.start + self.length == self.seq.num_tokens


class CapacityError(ValueError):
    """A request that can never fit in the cache, however empty."""


class Scheduler:
    def __init__(
        self,
        managers: dict[str, BlockManager],
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
    ):
        self.managers = managers
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def check_fits(self, num_tokens: int, longest_image: int = 0) -> None:
        """Refuse at once what could never be scheduled, instead of letting it wait forever."""
        if num_tokens > self.max_model_len:
            raise CapacityError(f"{num_tokens} tokens exceed the maximum model length of {self.max_model_len}")
        chunk = max(self.max_num_batched_tokens, longest_image)
        for pool, m in self.managers.items():
            need = max_blocks_per_seq(num_tokens, self.block_size, m.window, chunk)
            if need > m.pool.num_blocks:
                raise CapacityError(
                    f"{num_tokens} tokens need {need} blocks of the {pool} cache pool, but it has only "
                    f"{m.pool.num_blocks}; give the server more cache memory or send a shorter prompt"
                )

    def add(self, seq: Sequence, max_total_tokens: int) -> None:
        """Queue a sequence that may grow to max_total_tokens; refuse it now if it could never get there."""
        self.check_fits(max_total_tokens, max((im.end - im.start for im in seq.images), default=0))
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling -------------------------------------------------------------------------------------

    def _fits(self, seq: Sequence, start: int, end: int) -> bool:
        return all(m.blocks_needed(seq.seq_id, start, end) <= m.num_free for m in self.managers.values())

    def _extend(self, seq: Sequence, start: int, end: int) -> None:
        for m in self.managers.values():
            m.extend(seq.seq_id, start, end)

    def _free(self, seq: Sequence) -> None:
        for m in self.managers.values():
            m.free(seq.seq_id)

    def preempt(self, seq: Sequence) -> None:
        self._free(seq)
        self.running.remove(seq)
        seq.status, seq.num_computed = Status.WAITING, 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _take_prefix(self, seq: Sequence) -> None:
        """Start a new sequence on the longest cached prefix every pool can serve."""
        if seq.scores_prompt:
            return
        hashes = seq.block_hashes(seq.num_tokens, self.block_size)
        n_max = min(len(hashes), (seq.num_tokens - 1) // self.block_size)  # compute >= 1 token for logits
        for n in range(n_max, 0, -1):
            if seq.splits_image(n * self.block_size):
                continue
            if all(m.can_serve_prefix(hashes, n) for m in self.managers.values()):
                shared = {g: m.blocks_to_share(hashes, n) for g, m in self.managers.items()}
                if all(shared[g] <= m.num_free for g, m in self.managers.items()):
                    for m in self.managers.values():
                        m.take_prefix(seq.seq_id, hashes, n)
                    seq.num_computed = n * self.block_size
                    break

    @staticmethod
    def seq_budget(seq: Sequence, budget: int) -> int:
        """The tokens `seq` may compute this step, of the step's `budget`."""
        if seq.scores_prompt and seq.num_computed < len(seq.prompt_ids):
            return min(budget, PROMPT_SCORING_CHUNK)
        return budget

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            start = seq.num_computed
            length = seq.chunk_length(start, self.seq_budget(seq, budget))
            while not self._fits(seq, start, start + length):
                victim = max(self.running, key=lambda s: s.arrival)
                self.preempt(victim)
                chunks = [c for c in chunks if c.seq is not victim]
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self._extend(seq, start, start + length)
            chunks.append(ScheduledChunk(seq, start, length))
            budget = max(budget - length, 0)

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if any(c.seq.request_id == seq.request_id and c.start < len(c.seq.prompt_ids) for c in chunks):
                break  # a sibling sample is computing the shared prompt: start next step, on its cached blocks
            if seq.num_computed == 0:
                self._take_prefix(seq)
            start = seq.num_computed
            length = seq.chunk_length(start, self.seq_budget(seq, budget))
            if not self._fits(seq, start, start + length):
                if start > 0:  # give back the prefix blocks it took; it retries next step
                    self._free(seq)
                    seq.num_computed = 0
                break
            if start > 0 and not seq.output_ids and not seq.num_cached_prompt:
                seq.num_cached_prompt = start
            self.waiting.popleft()
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self._extend(seq, start, start + length)
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, start, length))
            budget -= length
            budget = max(budget, 0)
        for chunk in chunks:
            chunk.block_tables = [m.tables[chunk.seq.seq_id] for m in self.managers.values()]
        return chunks

    # -- after the forward ------------------------------------------------------------------------------

    def advance(self, chunk: ScheduledChunk) -> None:
        """The chunk's factors are in the cache: publish full blocks, drop what slid out of the window."""
        seq = chunk.seq
        seq.num_computed = chunk.start + chunk.length
        hashes = seq.block_hashes(seq.num_computed, self.block_size)
        for m in self.managers.values():
            m.register_full_blocks(seq.seq_id, hashes, seq.num_computed)
            m.slide(seq.seq_id, seq.num_computed)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self._free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
