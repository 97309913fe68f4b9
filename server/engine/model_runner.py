"""The model runner: everything the engine does on the device.

It sizes and allocates the KV cache (one block pool per distinct layer cache spec), turns the scheduler's
chunks into one packed batch with its attention metadata, runs the model's forward, and hands back the
logits of the rows that sample. The scheduler never sees a tensor; the model never sees a sequence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tpa_model.backends import make_backend
from tpa_model.capacity import CacheLayout, CapacityReport, capacity_report, tpa_layout
from tpa_model.kv_cache import KVCache
from tpa_model.metadata import AttentionMetadata, build_metadata
from tpa_model.model import GemmaTPAModel

from .scheduler import ScheduledChunk

log = logging.getLogger("gemma_tpa.engine")

CPU_CACHE_BYTES = 1 << 30


def default_cache_bytes(model: GemmaTPAModel) -> int:
    """90% of the device memory left after loading on CUDA; 1 GiB on the CPU."""
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        return int(free * 0.9)
    return CPU_CACHE_BYTES


@dataclass
class StepInputs:
    """One packed forward's inputs; decodes come first so attention batches them."""

    input_ids: torch.Tensor  # [N]
    metadata: AttentionMetadata
    pixel_values: torch.Tensor | None
    sampling: list[ScheduledChunk]  # the chunks that reached their sequence's end, in logits order


@dataclass
class StepOutput:
    sampling: list[ScheduledChunk]
    logits: torch.Tensor  # float32 [len(sampling), vocab]


class ModelRunner:
    def __init__(
        self,
        model: GemmaTPAModel,
        block_size: int,
        session_len: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        cache_bytes: int | None = None,
        num_blocks: int | dict[str, int] | None = None,
        attention_backend: str = "auto",
    ):
        self.model = model
        self.layout: CacheLayout = tpa_layout(model.config, model.dtype, block_size)
        if num_blocks is None:
            memory = cache_bytes if cache_bytes is not None else default_cache_bytes(model)
            num_blocks, sessions = self.layout.plan(memory, session_len, max_num_batched_tokens, max_num_seqs)
            if sessions < 1:
                raise ValueError(
                    f"{memory / 2**30:.3f} GiB of cache memory is too little: one session of {session_len} "
                    f"tokens needs {self.layout.session_bytes(session_len) / 2**30:.3f} GiB; give more memory "
                    "or lower --max-model-len"
                )
        elif isinstance(num_blocks, int):
            num_blocks = {pool: num_blocks for pool in self.layout.block_bytes}
        self.kv = KVCache(self.layout.specs, num_blocks, block_size, model.device)
        self.backend = make_backend(attention_backend, model.device)
        log.info("attention backend: %s", self.backend.name)
        self.capacity: CapacityReport = capacity_report(
            self.layout, self.kv.num_blocks, session_len, max_num_batched_tokens, max_num_seqs
        )

    @property
    def pools(self) -> dict[str, tuple[int | None, int]]:
        """pool -> (window, number of blocks): what the block managers mirror."""
        return {p.name: (p.window, self.kv.num_blocks[p.name]) for p in self.kv.pools}

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> StepOutput:
        """One forward over the chunks' new tokens; logits of the rows that sample."""
        step = self.prepare(chunks)
        logits = self.model(step.input_ids, step.metadata.positions, step.metadata, pixel_values=step.pixel_values)
        return StepOutput(step.sampling, logits.float())

    def prepare(self, chunks: list[ScheduledChunk]) -> StepInputs:
        """The host side of a step: packed token ids, images and the attention metadata."""
        chunks = sorted(chunks, key=lambda c: c.length != 1)
        device = self.model.device
        ids = [t for c in chunks for t in c.seq.tokens(c.start, c.start + c.length)]
        images = [c.images for c in chunks]
        pixels = [im.pixel_values for ims in images for im in ims]
        ends, total = [], 0
        for c in chunks:
            total += c.length
            ends.append(total)
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        tables = [[c.block_tables[p] for c in chunks] for p in range(len(self.kv.pools))]
        meta = build_metadata(
            self.kv, self.backend, [c.start for c in chunks], [c.length for c in chunks], tables,
            [ends[i] - 1 for i in sampling], [[(im.start, im.end) for im in ims] for ims in images], device,
        )
        input_ids = torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True)
        pixel_values = torch.stack(pixels).to(device) if pixels else None
        return StepInputs(input_ids, meta, pixel_values, [chunks[i] for i in sampling])
