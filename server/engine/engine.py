"""The engine: requests in, tokens and text out, many sequences sharing one model and one paged cache."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch

from tpa_model.cache.metadata import image_spans
from tpa_model.cache.quantization import KVCacheDtype
from tpa_model.checkpoints.provenance import summary as quality_summary
from tpa_model.evaluation.cache_dtype_costs import describe as describe_cache_dtype
from tpa_model.model.decoder import GemmaTPAModel
from tpa_model.sampling import ParamError, SamplingParams, make_generator, sample, token_logprobs
from tpa_model.tokenizers.gemma_tokenizer import GemmaTokenizer
from tpa_model.tokenizers.prompts import PromptInputs, build_chat_inputs

from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner, StepOutput
from .scheduler import ImageInput, Scheduler, Sequence, Status
from .structured import StructuredOutputs, consume

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
    error: BaseException | None = None  # a step failed this request: it ended, its samples say "error"
    # with SamplingParams.prompt_logprobs, once the prompt is computed: (logprob, top list) of prompt tokens
    # 1, 2, ... (token 0 has no context to be scored in)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


@dataclass
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    cache_memory_gib: float | None = None  # default: CUDA: sized by a warm-up (gpu_memory_utilization); CPU: 1 GiB
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of total memory for weights, activations and cache
    num_blocks: int | dict[str, int] | None = None  # exact pool sizes (tests), by pool name; overrides memory
    prefix_caching: bool = True
    attention_backend: str = "auto"  # auto: triton on CUDA when it imports, else reference
    kv_cache_dtype: str = "auto"  # how keys are stored: auto (the model's dtype), int8, fp8_e4m3 (fp8), int4
    v_cache_dtype: str | None = None  # how values are stored; None: as the keys
    cuda_graphs: bool | None = None  # None: decode steps from CUDA graphs where they work; False: eager


class LLMEngine:
    """Requests in, tokens and text out. `step()` schedules, runs the model once, samples, detokenizes."""

    def __init__(self, model: GemmaTPAModel, tokenizer: GemmaTokenizer, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = cfg = config or EngineConfig()
        text = model.config
        self.max_model_len = min(cfg.max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        cache_bytes = int(cfg.cache_memory_gib * 2**30) if cfg.cache_memory_gib else None
        cache_dtype = KVCacheDtype.parse(cfg.kv_cache_dtype, cfg.v_cache_dtype)
        self.runner = ModelRunner(model, cfg.block_size, self.max_model_len, cfg.max_num_seqs,
                                  cfg.max_num_batched_tokens, cache_bytes, cfg.num_blocks, cfg.attention_backend,
                                  cfg.gpu_memory_utilization, cfg.cuda_graphs, cache_dtype)
        self.managers = {
            pool: BlockManager(blocks, cfg.block_size, window, cfg.prefix_caching)
            for pool, (window, blocks) in self.runner.pools.items()
        }
        longest = min((blocks * cfg.block_size for window, blocks in self.runner.pools.values() if window is None),
                      default=self.max_model_len)
        if longest < self.max_model_len:
            log.warning("the KV cache holds %d tokens per sequence; lowering max_model_len from %d to %d",
                        longest, self.max_model_len, longest)
            self.max_model_len = longest
        self.scheduler = Scheduler(
            self.managers, cfg.block_size, cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len
        )
        log.info("%s", self.capacity.format())
        cache = describe_cache_dtype(text, cache_dtype) if cache_dtype.quantized else None
        log.info("%s", quality_summary(getattr(model, "provenance", None), self.is_exact, cache))
        self.eos_ids = frozenset(tokenizer.stop_token_ids) | frozenset(text.eos_token_id)
        self.never_sampled = self._never_sampled_ids()
        self.structured = StructuredOutputs(tokenizer, text.vocab_size, self.eos_ids)
        self.requests: dict[str, list[Sequence]] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0

    @property
    def capacity(self):
        return self.runner.capacity

    @property
    def is_exact(self) -> bool:
        """Full rank everywhere, no learned head factors: the original model's outputs."""
        c = self.model.config
        G = c.num_key_value_heads
        full = all(c.layer_ranks(i) == (G, G) for i in range(c.num_hidden_layers))
        return full and not c.tpa.contextual_heads and c.tpa.q_rank in (None, c.num_attention_heads)

    @property
    def vision_config(self):
        """The model's vision config, or None for a text-only model."""
        return self.model.vision_config

    def build_inputs(self, messages: list[dict], images=(), pan_and_scan: bool = False) -> PromptInputs:
        """Token ids and pixels of a chat whose image parts are `images` (decoded PIL images), in order. Reads
        only the tokenizer and the configs, so any thread may call it."""
        return build_chat_inputs(self.tokenizer, self.model.vision_config, messages, images, pan_and_scan)

    def _never_sampled_ids(self) -> torch.Tensor:
        """Ids no sequence may sample: embedding rows past the tokenizer's vocabulary (they decode to nothing),
        the image soft token (only an image makes it) and pad (it ends nothing and means nothing), unless pad
        doubles as a stop token, as some tokenizers have it."""
        vocab = self.model.config.vocab_size
        ids = set(range(self.tokenizer.vocab_size, vocab))
        for special in (self.model.image_token_id, self.tokenizer.image_token_id, self.tokenizer.pad_id):
            if special is not None and 0 <= special < vocab and special not in self.eos_ids:
                ids.add(special)
        return torch.tensor(sorted(ids), dtype=torch.long, device=self.model.device)

    # -- requests ---------------------------------------------------------------------------------------

    def image_inputs(self, prompt_ids: list[int], pixel_values: torch.Tensor | None) -> list[ImageInput]:
        """Pair each run of image soft tokens in the prompt with its image, checking that they match."""
        runs = image_spans(prompt_ids, self.model.image_token_id)
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
            images.append(ImageInput(a, b, pv, image_key(pv)))
        return images

    def check_token_ids(self, prompt_ids: list[int]) -> None:
        """Ids outside the embedding would fail the step of every request in the batch: refuse them here."""
        vocab, image = self.model.config.vocab_size, self.model.image_token_id
        for t in prompt_ids:
            if not isinstance(t, int) or isinstance(t, bool) or not (0 <= t < vocab or t == image):
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {t!r}")

    def check_logit_bias(self, params: SamplingParams) -> None:
        vocab = self.model.config.vocab_size
        for t in params.logit_bias:
            if t >= vocab:
                raise ParamError("logit_bias", f"logit_bias keys must be token ids below {vocab}, got {t}")

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
        self.check_logit_bias(params)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        self.check_token_ids(prompt_ids)
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) fills the maximum model length of "
                             f"{self.max_model_len} tokens")
        max_tokens = self.max_model_len - len(prompt_ids) if params.max_tokens is None else params.max_tokens
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise ValueError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the maximum "
                f"model length of {self.max_model_len} tokens"
            )
        images = self.image_inputs(prompt_ids, pixel_values)
        if params.structured is not None:
            self.structured.compile(params.structured)
        seqs = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            seq = Sequence(f"{request_id}#{i}", request_id, i, list(prompt_ids), params,
                           generator=make_generator(seed, self.model.device), images=images)
            if params.structured is not None:
                seq.matcher = self.structured.matcher(params.structured)
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
        """Schedule, run one packed forward, sample, detokenize; returns the requests that made progress.

        An error fails only the requests it concerns and the engine goes on: a failed forward or draw is
        retried sequence by sequence (rewriting a sequence's cache slots is harmless), and whatever fails alone
        ends its request with `error` set. Only a scheduler error escapes: the engine's state is then unknown."""
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        try:
            out = self.runner.run(chunks)
            tokens, failed = self.sample(out)
        except Exception:
            log.exception("a step of %d sequences failed; running them one at a time", len(chunks))
            return self.step_one_by_one(chunks)
        return self.finish_step(chunks, out.sampling, tokens, failed)

    def step_one_by_one(self, chunks: list) -> list[RequestOutput]:
        """Each chunk in its own forward, so a failure is pinned on the request that causes it."""
        sampling, tokens, failed = [], [], {}
        for chunk in chunks:
            if chunk.seq.request_id in failed:
                continue
            try:
                out = self.runner.run([chunk])
                chunk_tokens, chunk_failed = self.sample(out)
            except Exception as exc:
                failed[chunk.seq.request_id] = exc
                continue
            failed.update(chunk_failed)
            sampling += out.sampling
            tokens += chunk_tokens
        return self.finish_step(chunks, sampling, tokens, failed)

    def finish_step(self, chunks, sampling, tokens, failed: dict[str, BaseException]) -> list[RequestOutput]:
        """After the forward: the failed requests end with their error, the others advance and take a token."""
        for rid, exc in failed.items():
            log.error("request %s failed in a step: %r", rid, exc)
        outputs = [self.fail(rid, exc) for rid, exc in failed.items() if rid in self.requests]
        for chunk in chunks:
            if chunk.seq.request_id not in failed:
                self.scheduler.advance(chunk)
        kept = [(c, t) for c, t in zip(sampling, tokens) if c.seq.request_id not in failed]
        return outputs + self.detokenize([c for c, _ in kept], [t for _, t in kept])

    def fail(self, request_id: str, error: BaseException) -> RequestOutput:
        """End a request that a step could not compute: its blocks are freed, unfinished samples say "error"."""
        for seq in self.requests[request_id]:
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq, "error")
        out = self._output(request_id, [])
        out.error = error
        return out

    def sample(self, out: StepOutput) -> tuple[list[tuple[int, float | None, list | None]], dict[str, BaseException]]:
        """(token, logprob, top logprobs) for each sampling sequence, and the requests whose logits are not
        numbers (NaN or +inf: a token drawn from them would be arbitrary), which fail instead."""
        self.score_prompts(out)
        if not out.sampling:
            return [], {}
        logits = out.logits
        broken = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=1)
        failed = {}
        for row in broken.nonzero().flatten().tolist():
            seq = out.sampling[row].seq
            failed[seq.request_id] = FloatingPointError(f"the model's logits for {seq.seq_id} are not finite")
            logits[row] = 0.0
        logits[:, self.never_sampled] = float("-inf")
        seqs = [c.seq for c in out.sampling]
        constrained = [(row, seq.matcher) for row, seq in enumerate(seqs) if seq.matcher is not None]
        if constrained:
            self.structured.mask(logits, constrained)
        result = sample(logits, [s.params for s in seqs], [s.generator for s in seqs],
                        [s.prompt_ids for s in seqs], [s.output_ids for s in seqs])
        return list(zip(result.token_ids, result.logprobs, result.top_logprobs)), failed

    def score_prompts(self, out: StepOutput) -> None:
        """Record the logprobs of the prompt tokens this step's logits score: the model's own distribution
        (no penalties, bias or masks), as vLLM's prompt_logprobs."""
        if not out.scoring:
            return
        positions = [(seq, p) for seq, first, rows in out.scoring for p in range(first, first + rows)]
        targets = torch.tensor([seq.prompt_ids[p + 1] for seq, p in positions], device=out.prompt_logits.device)
        k = max(seq.params.prompt_logprobs for seq, *_ in out.scoring)
        chosen, tops = token_logprobs(out.prompt_logits, targets, k)
        for (seq, p), logprob, top in zip(positions, chosen, tops):
            assert p == len(seq.prompt_logprobs), "prompt positions are scored in order, each once"
            seq.prompt_logprobs.append((logprob, top[:seq.params.prompt_logprobs]))

    def detokenize(self, chunks, tokens) -> list[RequestOutput]:
        """Append each sampled token; an error here (the detokenizer's) fails only that token's request."""
        progressed: dict[str, list[tuple[Sequence, str]]] = {}
        failed: dict[str, BaseException] = {}
        for chunk, (token, logprob, top) in zip(chunks, tokens):
            rid = chunk.seq.request_id
            if rid in failed:
                continue
            try:
                delta = self._append(chunk.seq, token, logprob, top)
            except Exception as exc:
                log.exception("request %s failed while detokenizing", rid)
                failed[rid] = exc
                continue
            progressed.setdefault(rid, []).append((chunk.seq, delta))
        outputs = [self.fail(rid, exc) for rid, exc in failed.items()]
        return outputs + [self._output(rid, deltas) for rid, deltas in progressed.items() if rid not in failed]

    def _append(self, seq: Sequence, token: int, logprob, top) -> str:
        if seq.params.max_tokens == 0:  # the prompt only: the token its last position predicts is not taken
            self.scheduler.finish(seq, "length")
            return ""
        complete = seq.matcher is not None and consume(seq.matcher, token)
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
            seq.top_logprobs.append(top or [])
        self.num_generated_tokens += 1
        detok = self.detokenizers[seq.seq_id]
        delta = detok.add(token)
        p = seq.params
        reason = None
        if complete or detok.stopped or token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
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
        scored = first.scores_prompt and len(first.prompt_logprobs) == len(first.prompt_ids) - 1
        out = RequestOutput(request_id, first.prompt_ids, outputs, finished, first.num_cached_prompt, queued,
                            prompt_logprobs=first.prompt_logprobs if scored else None)
        if finished:
            del self.requests[request_id]
            for s in seqs:
                self.detokenizers.pop(s.seq_id, None)
        return out

    # -- introspection ----------------------------------------------------------------------------------

    def block_usage(self) -> dict[str, tuple[int, int]]:
        """(used, total) blocks per cache pool; cached-but-unreferenced blocks count as free."""
        return {g: (m.pool.num_blocks - m.num_free, m.pool.num_blocks) for g, m in self.managers.items()}

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions


def image_key(pixel_values: torch.Tensor) -> int:
    """A negative 56-bit digest of an image's pixels: it stands in for the image's soft tokens in prefix
    hashing, so two prompts share blocks past an image only if the images are equal (token ids are >= 0)."""
    data = pixel_values.detach().cpu().contiguous()
    digest = hashlib.sha256(str(tuple(data.shape)).encode() + data.numpy().tobytes()).digest()
    return -1 - int.from_bytes(digest[:7], "little")
