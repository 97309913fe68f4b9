"""The engine: requests in, tokens and text out, many sequences sharing one model and one paged cache."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from tpa_model.capacity import CapacityReport, report_for_pools, tpa_layout
from tpa_model.config import GLOBAL, SLIDING
from tpa_model.model import GemmaTPAModel
from tpa_model.paged import PagedContext, PagedFactorCache, SequenceChunk
from tpa_model.sampling import SamplingParams, make_generator, sample
from tpa_model.tokenizer import GemmaTokenizer

from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .scheduler import ImageInput, Scheduler, Sequence, Status

log = logging.getLogger("gemma_tpa.engine")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    queue_seconds: float | None = None  # arrival to first scheduling, of the request's first sample


@dataclass
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    cache_memory_gib: float | None = None  # default: 90% of free GPU memory on CUDA, 1 GiB on CPU
    num_blocks: dict[str, int] | None = None  # exact pool sizes (tests); overrides cache_memory_gib
    prefix_caching: bool = True


def plan_blocks(model: GemmaTPAModel, cfg: EngineConfig, cache_bytes: int) -> dict[str, int]:
    """Split the cache memory: sliding layers get the blocks their windows need, global layers the rest."""
    text = model.config
    block_bytes = tpa_layout(text, model.dtype, cfg.block_size).block_bytes  # read off the real layout
    window_blocks = math.ceil(text.sliding_window / cfg.block_size) + 1
    sliding = cfg.max_num_seqs * window_blocks + math.ceil(cfg.max_num_batched_tokens / cfg.block_size) + 1
    sliding = sliding if block_bytes[SLIDING] else 0
    left = cache_bytes - sliding * block_bytes[SLIDING]
    global_blocks = left // block_bytes[GLOBAL] if block_bytes[GLOBAL] else 0
    if left < 0 or (block_bytes[GLOBAL] and global_blocks < 1):
        raise ValueError(
            f"{cache_bytes / 2**30:.3f} GiB of cache memory is too little: the sliding-window layers alone need "
            f"{sliding * block_bytes[SLIDING] / 2**30:.3f} GiB for {cfg.max_num_seqs} sequences"
        )
    return {GLOBAL: int(global_blocks), SLIDING: int(sliding)}


def default_cache_bytes(model: GemmaTPAModel) -> int:
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        return int(free * 0.9)
    return 1 << 30


class LLMEngine:
    def __init__(self, model: GemmaTPAModel, tokenizer: GemmaTokenizer, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = cfg = config or EngineConfig()
        text = model.config
        self.max_model_len = min(cfg.max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        if cfg.num_blocks is not None:
            num_blocks = cfg.num_blocks
        else:
            cache_bytes = int(cfg.cache_memory_gib * 2**30) if cfg.cache_memory_gib else default_cache_bytes(model)
            num_blocks = plan_blocks(model, cfg, cache_bytes)
        self.cache = PagedFactorCache(text, num_blocks, cfg.block_size, model.dtype, model.device)
        self.managers = {
            GLOBAL: BlockManager(num_blocks[GLOBAL], cfg.block_size, None, cfg.prefix_caching),
            SLIDING: BlockManager(num_blocks[SLIDING], cfg.block_size, text.sliding_window, cfg.prefix_caching),
        }
        self.scheduler = Scheduler(
            self.managers, cfg.block_size, cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len
        )
        longest = num_blocks[GLOBAL] * cfg.block_size if GLOBAL in text.layer_types else self.max_model_len
        if longest < self.max_model_len:
            log.warning("the factor cache holds %d tokens; lowering max_model_len from %d to %d",
                        longest, self.max_model_len, longest)
            self.max_model_len = longest
        self.scheduler.max_model_len = self.max_model_len
        self.capacity: CapacityReport = report_for_pools(self.cache, self.max_model_len, cfg.max_num_seqs)
        log.info("%s", self.capacity.format())
        self.eos_ids = frozenset(tokenizer.stop_token_ids) | frozenset(text.eos_token_id)
        self.requests: dict[str, list[Sequence]] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0

    # -- requests ---------------------------------------------------------------------------------------

    def image_inputs(self, prompt_ids: list[int], pixel_values: torch.Tensor | None) -> list[ImageInput]:
        """Pair each run of image soft tokens in the prompt with its image, checking that they match."""
        token = self.model.image_token_id
        runs, pos = [], 0
        while token is not None and pos < len(prompt_ids):
            if prompt_ids[pos] == token:
                end = pos
                while end < len(prompt_ids) and prompt_ids[end] == token:
                    end += 1
                runs.append((pos, end))
                pos = end
            else:
                pos += 1
        num_images = 0 if pixel_values is None else len(pixel_values)
        if num_images and self.model.vision_config is None:
            raise ValueError("this model has no vision tower; it cannot read images")
        if len(runs) != num_images:
            raise ValueError(f"the prompt has {len(runs)} image placeholder(s) but {num_images} image(s) were given")
        per_image = self.model.vision_config.mm_tokens_per_image if runs else 0
        images = []
        for (a, b), pv in zip(runs, pixel_values if num_images else []):
            if b - a != per_image:
                raise ValueError(f"an image takes {per_image} soft tokens, but the prompt has a run of {b - a}")
            key = hash((pv.shape, pv.detach().cpu().numpy().tobytes()))
            images.append(ImageInput(a, b, pv, key))
        return images

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        pixel_values: torch.Tensor | None = None,
    ) -> None:
        """Queue a request; raises ValueError (CapacityError) at once if it can never run.

        pixel_values [num_images, 3, size, size] fill the prompt's image soft-token runs in order."""
        params.validate()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) fills the maximum model length of "
                             f"{self.max_model_len} tokens")
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_ids)
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise ValueError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the maximum "
                f"model length of {self.max_model_len} tokens"
            )
        images = self.image_inputs(prompt_ids, pixel_values)
        seqs = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            seq = Sequence(f"{request_id}#{i}", request_id, i, list(prompt_ids), params,
                           generator=make_generator(seed, self.model.device), images=images)
            self.scheduler.add(seq, len(prompt_ids) + max_tokens)
            self.detokenizers[seq.seq_id] = IncrementalDetokenizer(
                self.tokenizer, params.stop, skip_special_tokens=params.skip_special_tokens
            )
            seqs.append(seq)
        self.requests[request_id] = seqs
        self.num_prompt_tokens += len(prompt_ids)

    def abort(self, request_id: str) -> bool:
        """Stop a request at once and free all of its blocks. False if it was not running."""
        seqs = self.requests.pop(request_id, None)
        if seqs is None:
            return False
        for seq in seqs:
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq, "abort")
            self.detokenizers.pop(seq.seq_id, None)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule, run one packed forward, sample; returns the requests that made progress."""
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        device = self.model.device
        input_ids = torch.tensor(
            [t for c in chunks for t in c.seq.token_ids[c.start : c.start + c.length]], dtype=torch.long, device=device
        )
        seq_chunks, pixels = [], []
        for c in chunks:
            images = [im for im in c.seq.images if c.start <= im.start and im.end <= c.start + c.length]
            pixels += [im.pixel_values for im in images]
            tables = {g: m.tables[c.seq.seq_id] for g, m in self.managers.items()}
            seq_chunks.append(SequenceChunk(c.start, c.length, tables, [(im.start, im.end) for im in images]))
        ctx = PagedContext(self.cache, seq_chunks, device)
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        rows = torch.tensor([ctx.offsets[i + 1] - 1 for i in sampling], dtype=torch.long, device=device)
        pixel_values = torch.stack(pixels) if pixels else None
        logits = self.model.forward_paged(input_ids, ctx, rows, pixel_values).float()
        for c in chunks:
            self.scheduler.advance(c)
        if not sampling:
            return []
        logits[:, self.tokenizer.vocab_size :] = float("-inf")  # embedding rows past the tokenizer
        seqs = [chunks[i].seq for i in sampling]
        result = sample(
            logits, [s.params for s in seqs], [s.generator for s in seqs],
            [s.prompt_ids for s in seqs], [s.output_ids for s in seqs],
        )
        progressed: dict[str, list[tuple[Sequence, str]]] = {}
        for i, seq in enumerate(seqs):
            token = result.token_ids[i]
            delta = self._append(seq, token, result.logprobs[i], result.top_logprobs[i])
            progressed.setdefault(seq.request_id, []).append((seq, delta))
        return [self._output(rid, deltas) for rid, deltas in progressed.items()]

    def _append(self, seq: Sequence, token: int, logprob, top) -> str:
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
            seq.top_logprobs.append(top or [])
        self.num_generated_tokens += 1
        detok = self.detokenizers[seq.seq_id]
        delta = detok.add(token)
        p = seq.params
        reason = None
        if detok.stopped or token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            reason = "stop"
        elif (p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            if not detok.stopped:
                delta += detok.finish()
            self.scheduler.finish(seq, reason)
        return delta

    def _output(self, request_id: str, deltas: list[tuple[Sequence, str]]) -> RequestOutput:
        seqs = self.requests[request_id]
        delta_of = {seq.seq_id: delta for seq, delta in deltas}
        outputs = []
        for seq in seqs:
            detok = self.detokenizers[seq.seq_id]
            moved = seq.seq_id in delta_of
            outputs.append(CompletionOutput(
                index=seq.index,
                text=detok.text,
                token_ids=list(seq.output_ids),
                finish_reason=seq.finish_reason,
                delta_text=delta_of.get(seq.seq_id, ""),
                delta_token_ids=seq.output_ids[-1:] if moved else [],
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                top_logprobs=list(seq.top_logprobs) if seq.params.logprobs is not None else None,
            ))
        finished = all(s.status is Status.FINISHED for s in seqs)
        first = seqs[0]
        queued = None if first.first_scheduled_time is None else first.first_scheduled_time - first.arrival_time
        out = RequestOutput(request_id, first.prompt_ids, outputs, finished, first.num_cached_prompt, queued)
        if finished:
            del self.requests[request_id]
            for s in seqs:
                self.detokenizers.pop(s.seq_id, None)
        return out

    # -- introspection ----------------------------------------------------------------------------------

    def block_usage(self) -> dict[str, tuple[int, int]]:
        """(used, total) blocks per group; cached-but-unreferenced blocks count as free."""
        return {g: (m.pool.num_blocks - m.num_free, m.pool.num_blocks) for g, m in self.managers.items()}

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions
