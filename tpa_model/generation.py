"""Offline generation over a contiguous cache, for one batch of equal-length prompts.

The serving engine (server/engine) is the general path; this one is small enough to read in one sitting and
serves as the reference the engine is tested against.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .cache.backends import default_backend
from .cache.kv_cache import ContiguousKVCache
from .cache.metadata import image_spans
from .model.decoder import GemmaTPAModel
from .sampling import SamplingParams, make_generator, sample


@torch.inference_mode()
def generate(
    model: GemmaTPAModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    stop_token_ids: Iterable[int] = (),
    vocab_limit: int | None = None,
    pixel_values: torch.Tensor | None = None,
) -> list[list[int]]:
    """Generate for a batch of prompts of equal length (greedy unless params say otherwise). Each output
    stops at its first stop token (included) or after max_new_tokens. Ids >= vocab_limit are never produced:
    Gemma 3's embedding table (262208) is larger than its tokenizer (262145). With a seed, row b draws from
    seed + b."""
    params = params or SamplingParams(temperature=0.0)
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("generate() takes prompts of equal length; run different lengths separately")
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    ids = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=model.device)
    B, L = ids.shape
    cache = ContiguousKVCache(model.config, B, L + max_new_tokens, model.dtype, model.device,
                              backend=default_backend(model.device), cache_dtype=model.kv_cache_dtype)
    generators = [make_generator(None if params.seed is None else params.seed + b, model.device) for b in range(B)]
    stops = set(stop_token_ids)
    outputs: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B

    images = [image_spans(p, model.image_token_id) for p in prompts]
    meta = cache.step(L, last_only=True, images=images)
    logits = model(ids.reshape(-1), meta.positions, meta, pixel_values=pixel_values)
    for step in range(max_new_tokens):
        logits = logits.float()
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        result = sample(logits, [params] * B, generators, [list(p) for p in prompts], outputs)
        for b, token in enumerate(result.token_ids):
            if not done[b]:
                outputs[b].append(token)
                done[b] = token in stops
        if all(done) or step == max_new_tokens - 1:
            break
        next_ids = torch.tensor(result.token_ids, dtype=torch.long, device=model.device)
        meta = cache.step(1)
        logits = model(next_ids, meta.positions, meta)
    return outputs
