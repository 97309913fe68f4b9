"""Offline generation over the contiguous factor cache: greedy or sampled, one batch of equal-length prompts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .cache import ContiguousFactorCache
from .model import GemmaTPAModel


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]."""
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: GemmaTPAModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling | None = None,
    stop_token_ids: Iterable[int] = (),
    vocab_limit: int | None = None,
    pixel_values: torch.Tensor | None = None,
) -> list[list[int]]:
    """Generate for a batch of prompts of equal length; each output stops at its first stop token
    (included) or after max_new_tokens. Ids >= vocab_limit are never produced: Gemma 3's embedding table
    (262208) is larger than its tokenizer (262145)."""
    sampling = sampling or Sampling()
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("generate() takes prompts of equal length; run different lengths separately")
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    ids = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=model.device)
    B, L = ids.shape
    cache = ContiguousFactorCache(model.config, B, L + max_new_tokens, model.dtype, model.device)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(sampling.seed)
    stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=model.device)
    outputs: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=model.device)

    logits = model(ids, cache, pixel_values=pixel_values, last_token_only=True)[:, -1]
    for step in range(max_new_tokens):
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        next_ids = sample_next(logits, sampling, generator)
        for b in range(B):
            if not done[b]:
                outputs[b].append(int(next_ids[b]))
        done |= torch.isin(next_ids, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(next_ids[:, None], cache)[:, -1]
    return outputs
