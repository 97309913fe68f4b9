"""The offline API: LLM(model_path).generate(prompts or chats, sampling params)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path

import torch

from tpa_model.checkpoints.loader import load_model
from tpa_model.checkpoints.named_models import resolve_model
from tpa_model.sampling import SamplingParams
from tpa_model.tokenizers.hf_tokenizer import load_tokenizer
from tpa_model.tokenizers.prompts import PromptInputs, split_images

from .engine import EngineConfig, LLMEngine, RequestOutput

Prompt = str | list[int] | list[dict]


class LLM:
    """Batch generation with continuous batching over the paged KV cache, in this process."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        k_rank: int | str | None = None,
        v_rank: int | str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        kv_cache_dtype: str | None = None,
        v_cache_dtype: str | None = None,
        engine_config: EngineConfig | None = None,
    ):
        """kv_cache_dtype, v_cache_dtype: how the KV cache stores keys and values (auto, int8, fp8_e4m3, int4);
        given here, they override engine_config's."""
        self.model_path = resolve_model(model_path)  # None: the default model; or a known model's name
        model = load_model(self.model_path, k_rank=k_rank, v_rank=v_rank, dtype=dtype, device=device)
        self.tokenizer = load_tokenizer(self.model_path)
        config = engine_config or EngineConfig()
        if kv_cache_dtype is not None or v_cache_dtype is not None:
            config = dataclasses.replace(config, kv_cache_dtype=kv_cache_dtype or config.kv_cache_dtype,
                                         v_cache_dtype=v_cache_dtype or config.v_cache_dtype)
        self.engine = LLMEngine(model, self.tokenizer, config)
        self._ids = itertools.count()

    def encode(self, prompt: Prompt) -> PromptInputs:
        """Text is used as is (with bos); a list of messages goes through the chat template, with image parts
        `{"type": "image", "image": PIL image, path or bytes}`; token ids pass through."""
        if isinstance(prompt, str):
            return PromptInputs(self.tokenizer.encode(prompt, add_bos=True))
        if prompt and isinstance(prompt[0], dict):
            messages, images = split_images(prompt)
            return self.engine.build_inputs(messages, images)
        return PromptInputs(list(prompt))

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        order = []
        for prompt, p in zip(prompts, params_list):
            request_id = f"offline-{next(self._ids)}"
            inputs = self.encode(prompt)
            self.engine.add_request(request_id, inputs.token_ids, p, inputs.pixel_values)
            order.append(request_id)
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r] for r in order]
