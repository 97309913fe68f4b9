"""The model runner: everything the engine does on the device.

It sizes and allocates the KV cache (one block pool per distinct layer cache spec), turns the scheduler's
chunks into one packed batch with its attention metadata, runs the model's forward (decode steps from CUDA
graphs where it captured them, see cuda_graphs.py), and hands back the logits of the rows that sample. The
scheduler never sees a tensor; the model never sees a sequence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from tpa_model.cache.backends import make_backend
from tpa_model.cache.capacity import CacheLayout, CapacityReport, capacity_report, tpa_layout
from tpa_model.cache.kv_cache import KVCache
from tpa_model.cache.metadata import AttentionMetadata, build_metadata
from tpa_model.cache.quantization import AUTO, KVCacheDtype
from tpa_model.model.decoder import GemmaTPAModel

from .cuda_graphs import DecodeGraphs, graph_batch_sizes
from .scheduler import ScheduledChunk, Sequence

log = logging.getLogger("gemma_tpa.engine")

CPU_CACHE_BYTES = 1 << 30


def cache_budget(total: int, in_use: int, peak_extra: int, utilization: float) -> int:
    """Cache bytes on CUDA: `utilization` of the device's total memory, less what is in use after loading
    (weights, CUDA context) and less the activations' peak over a warm-up of the largest step."""
    budget = int(utilization * total) - in_use - peak_extra
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache: --gpu-memory-utilization {utilization} of {total / 2**30:.2f} "
            f"GiB is {utilization * total / 2**30:.2f} GiB, but {in_use / 2**30:.2f} GiB is in use after loading "
            f"(weights, CUDA context) and the largest step's activations peak at {peak_extra / 2**30:.2f} GiB; raise "
            "--gpu-memory-utilization, lower --max-num-batched-tokens or --max-num-seqs, or give --cache-memory"
        )
    return budget


def warmup_lengths(max_num_batched_tokens: int, max_num_seqs: int) -> list[int]:
    """The largest step's sequences: single-token decodes next to one prefill chunk of the remaining tokens."""
    seqs = max(1, min(max_num_seqs, max_num_batched_tokens))
    return [1] * (seqs - 1) + [max_num_batched_tokens - (seqs - 1)]


def warmup_cache_bytes(layout: CacheLayout, block_size: int, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """The throwaway cache warmup_step allocates: the real cache is budgeted on its own, so a step's activation
    peak leaves this out."""
    blocks = sum(-(-n // block_size) for n in warmup_lengths(max_num_batched_tokens, max_num_seqs))
    return blocks * sum(layout.block_bytes.values())


def warmup_step(
    model: GemmaTPAModel, layout: CacheLayout, backend, block_size: int, max_num_batched_tokens: int,
    max_num_seqs: int,
) -> tuple[int, int]:
    """One forward of the largest step the scheduler can make, over a throwaway cache freed on return:
    max_num_batched_tokens tokens, as many decodes as there can be sequences next to one prefill chunk of the
    rest, all of them computing logits (max_num_seqs rows, as the engine samples). Returns the logits' shape."""
    lengths = warmup_lengths(max_num_batched_tokens, max_num_seqs)
    seqs = len(lengths)
    per_seq = [-(-n // block_size) for n in lengths]
    kv = KVCache(layout.specs, {pool: sum(per_seq) for pool in layout.block_bytes}, block_size, model.device)
    tables, next_block = [], 0
    for n in per_seq:
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    ends = [sum(lengths[: i + 1]) - 1 for i in range(seqs)]
    meta = build_metadata(kv, backend, [0] * seqs, lengths, [tables] * len(kv.pools), ends, None, model.device)
    ids = torch.zeros(max_num_batched_tokens, dtype=torch.long, device=model.device)
    with torch.inference_mode():
        shape = tuple(model(ids, meta.positions, meta).float().shape)
    del kv, meta, ids
    return shape


def step_peak_bytes(model: GemmaTPAModel, layout: CacheLayout, backend, block_size: int, tokens: int,
                    seqs: int) -> int:
    """CUDA: the activation memory a warm-up step of `tokens` tokens over `seqs` sequences allocates at its
    peak (not its throwaway cache)."""
    device = model.device
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    warmup_step(model, layout, backend, block_size, tokens, seqs)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return max(0, peak - warmup_cache_bytes(layout, block_size, tokens, seqs))


def profile_cache_bytes(
    model: GemmaTPAModel, layout: CacheLayout, backend, block_size: int, max_num_batched_tokens: int,
    max_num_seqs: int, utilization: float, graphs: bool = False,
) -> int:
    """CUDA: the cache budget from a warm-up of the largest step (see cache_budget). With decode graphs, the
    activations of the largest decode step are held for good in the graphs' pool: they count as well. What the
    warm-ups leave outside PyTorch's allocator (cuBLAS workspaces, loaded kernels) counts as in use."""
    device = model.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free
    peak_extra = step_peak_bytes(model, layout, backend, block_size, max_num_batched_tokens, max_num_seqs)
    largest = graph_batch_sizes(max_num_seqs)[-1]
    graph_pool = step_peak_bytes(model, layout, backend, block_size, largest, largest) if graphs else 0
    free, _ = torch.cuda.mem_get_info(device)  # the warm-ups' tensors are freed and returned: only the rest stays
    in_use = max(in_use, total - free)
    budget = cache_budget(total, in_use, peak_extra + graph_pool, utilization)
    log.info(
        "GPU memory: %.2f GiB total, %.0f%% usable; %.2f GiB in use after loading (weights, CUDA context); "
        "activations of the largest step (%d tokens, %d sequences) peak at %.2f GiB; decode graphs hold %.2f GiB; "
        "%.2f GiB for the KV cache",
        total / 2**30, utilization * 100, in_use / 2**30, max_num_batched_tokens,
        min(max_num_seqs, max_num_batched_tokens), peak_extra / 2**30, graph_pool / 2**30, budget / 2**30,
    )
    return budget


@dataclass
class StepInputs:
    """One packed forward's inputs; decodes come first so attention batches them."""

    input_ids: torch.Tensor  # [N]
    metadata: AttentionMetadata
    pixel_values: torch.Tensor | None
    sampling: list[ScheduledChunk]  # the chunks that reached their sequence's end, in logits order
    scoring: list[tuple[Sequence, int, int]]  # (sequence, first position, rows) of the prompt positions scored,
    # whose logits follow the sampling rows

@dataclass
class StepOutput:
    sampling: list[ScheduledChunk]
    logits: torch.Tensor  # float32 [len(sampling), vocab]
    scoring: list[tuple[Sequence, int, int]] = field(default_factory=list)
    prompt_logits: torch.Tensor | None = None  # [sum of scoring rows, vocab], the model's dtype


def prompt_positions_to_score(chunk: ScheduledChunk) -> tuple[int, int]:
    """[first, last): the positions of the chunk whose logits score a prompt token not scored yet."""
    seq = chunk.seq
    if not seq.scores_prompt:
        return 0, 0
    first = max(chunk.start, len(seq.prompt_logprobs))
    return first, min(chunk.start + chunk.length, len(seq.prompt_ids) - 1)


class ModelRunner:
    """cuda_graphs: None captures decode graphs where they work (CUDA, the Triton backend, factors that are
    not refitted per token); False runs every step eagerly (--enforce-eager); True asks for them and, on a CPU,
    runs the same padded steps over the static buffers without capture (how the tests check them)."""

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
        gpu_memory_utilization: float = 0.9,
        cuda_graphs: bool | None = None,
        cache_dtype: KVCacheDtype = AUTO,
    ):
        self.model = model
        self.layout: CacheLayout = tpa_layout(model.config, model.dtype, block_size, cache_dtype)
        self.backend = make_backend(attention_backend, model.device)
        graphs = self.use_graphs(cuda_graphs)
        if num_blocks is None:
            num_blocks = self.plan_blocks(cache_bytes, session_len, max_num_seqs, max_num_batched_tokens,
                                          gpu_memory_utilization, graphs)
        elif isinstance(num_blocks, int):
            num_blocks = {pool: num_blocks for pool in self.layout.block_bytes}
        # with graphs, one more block per pool: the pad block that padding rows of a replayed step use
        pad_blocks = dict(num_blocks) if graphs else {}
        self.kv = KVCache(self.layout.specs, {p: n + (p in pad_blocks) for p, n in num_blocks.items()}, block_size,
                          model.device)
        self.num_blocks = dict(num_blocks)
        log.info("attention backend: %s", self.backend.name)
        self.capacity: CapacityReport = capacity_report(
            self.layout, self.num_blocks, session_len, max_num_batched_tokens, max_num_seqs
        )
        self.graphs = None
        if graphs:
            self.graphs = DecodeGraphs(model, self.kv, self.backend, pad_blocks, session_len, max_num_seqs,
                                       capture=model.device.type == "cuda")
            log.info("decode steps of up to %d sequences replay CUDA graphs (batch sizes %s)",
                     self.graphs.sizes[-1], self.graphs.sizes)

    def use_graphs(self, requested: bool | None) -> bool:
        """Whether decode steps run from graphs. They need the Triton backend: its kernels never read a key
        past a sequence's own, while the reference would read whole static tables. Per-token SVD factors
        (--factorization svd) call a solver that synchronizes with the host, which a capture forbids."""
        why_not = None
        if self.backend.name != "triton":
            why_not = f"decode graphs need the triton attention backend, not {self.backend.name}"
        elif self.model.config.tpa.factorization == "svd":
            why_not = "per-token SVD factors synchronize with the host, which a CUDA graph cannot capture"
        if requested is None:
            return why_not is None and self.model.device.type == "cuda"
        if requested and why_not:
            raise ValueError(why_not)
        return requested

    def plan_blocks(self, cache_bytes, session_len, max_num_seqs, max_num_batched_tokens, utilization,
                    graphs: bool) -> dict[str, int]:
        """Blocks per pool in the given memory, or (CUDA) in what a warm-up leaves of the device's; one block
        per pool is held back for the graphs' pad block."""
        model = self.model
        memory = cache_bytes
        if memory is None and model.device.type == "cuda":
            memory = profile_cache_bytes(model, self.layout, self.backend, self.layout.block_size,
                                         max_num_batched_tokens, max_num_seqs, utilization, graphs)
        elif memory is None:
            memory = CPU_CACHE_BYTES
        pad_bytes = sum(self.layout.block_bytes.values()) if graphs else 0
        num_blocks, sessions = self.layout.plan(memory - pad_bytes, session_len, max_num_batched_tokens,
                                                max_num_seqs)
        if sessions < 1:
            raise ValueError(
                f"{memory / 2**30:.3f} GiB of cache memory is too little: one session of {session_len} "
                f"tokens needs {self.layout.session_bytes(session_len) / 2**30:.3f} GiB; give more memory "
                "or lower --max-model-len"
            )
        return num_blocks

    @property
    def pools(self) -> dict[str, tuple[int | None, int]]:
        """pool -> (window, number of blocks): what the block managers mirror (never the pad block)."""
        return {p.name: (p.window, self.num_blocks[p.name]) for p in self.kv.pools}

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> StepOutput:
        """One forward over the chunks' new tokens; logits of the rows that sample."""
        step = self.prepare(chunks)
        if self.graphs is not None and self.graphs.can_run(step.metadata, step.pixel_values):
            logits = self.graphs.run(step.input_ids, step.metadata)
        else:
            logits = self.model(step.input_ids, step.metadata.positions, step.metadata,
                                pixel_values=step.pixel_values)
        n = len(step.sampling)
        return StepOutput(step.sampling, logits[:n].float(), step.scoring, logits[n:] if step.scoring else None)

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
        logits_rows = [ends[i] - 1 for i in sampling]
        scoring = []
        for c, end in zip(chunks, ends):
            first, last = prompt_positions_to_score(c)
            if last > first:  # the logits at position p score prompt token p + 1
                logits_rows += range(end - c.length + first - c.start, end - c.length + last - c.start)
                scoring.append((c.seq, first, last - first))
        tables = [[c.block_tables[p] for c in chunks] for p in range(len(self.kv.pools))]
        meta = build_metadata(
            self.kv, self.backend, [c.start for c in chunks], [c.length for c in chunks], tables,
            logits_rows, [[(im.start, im.end) for im in ims] for ims in images], device,
        )
        input_ids = torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True)
        pixel_values = torch.stack(pixels).to(device) if pixels else None
        return StepInputs(input_ids, meta, pixel_values, [chunks[i] for i in sampling], scoring)
