"""The legacy text-completions API, for base models that continue text: no template, the prompt as given.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from tpa_model.sampling import SamplingParams

from ..engine.async_engine import QueueFullError, RequestStream
from ..engine.engine import CompletionOutput, RequestOutput
from .protocol import (
    MAX_N,
    UNSUPPORTED_COMPLETION_FIELDS,
    APIError,
    CompletionRequest,
    joined_logprobs,
    legacy_logprobs,
    legacy_prompt_logprobs,
    new_id,
    now,
    text_end,
)
from .serving_engine import LatencyTimer, OpenAIServing, check_unsupported, output_usage, queue_full
from .sse import CompletionChunkWriter


@dataclass
class CompletionPrompt:
    token_ids: list[int]
    echo: str  # the text each of its choices starts with: the prompt's when the client asks for echo, else ""


class OpenAIServingCompletion(OpenAIServing):
    """The legacy text-completions API, for base models that continue text: no template, the prompt as given.

    A batch of prompts becomes one engine request per prompt; choice i of prompt p has index p * n + i.
    """

    async def create_completion(self, req: CompletionRequest, request: Request):
        """Refuse what we cannot honour before the engine sees it, then answer whole or as an SSE stream."""
        arrival = time.monotonic()
        self.check_request(req)
        structured = await self.structured_output(req)
        prompts = await asyncio.to_thread(self.build_prompts, req)  # tokenizing must not block the event loop
        jobs = [(p.token_ids, self.sampling_params(req, len(p.token_ids), structured)) for p in prompts]
        streams = await self.submit_all(jobs)
        response_id, created_at = new_id("cmpl"), now()
        timers = [LatencyTimer(self.metrics, arrival) for _ in streams]
        if req.stream:
            writer = CompletionChunkWriter(self.tokenizer, req, response_id, created_at, [p.echo for p in prompts])
            return self.streaming_response(streams, writer, req, timers)
        finals = await self.collect(streams, request, timers)
        if finals is None:
            return Response(status_code=499)
        return self.completion_body(finals, prompts, req, response_id, created_at)

    def check_request(self, req: CompletionRequest) -> None:
        """Options this server cannot honour are refused by name rather than quietly ignored."""
        self.check_text(req)
        check_unsupported(req, UNSUPPORTED_COMPLETION_FIELDS)
        if req.best_of is not None and req.best_of < req.n:
            raise APIError(400, f"best_of must be at least n ({req.n}), got {req.best_of}", param="best_of")
        if req.best_of is not None and req.best_of > req.n:
            raise APIError(400, "best_of greater than n is not supported by this server (it would rank samples "
                                "here by logprob); ask for n samples and rank them yourself", param="best_of")
        count = len(req.prompts())
        if count > 1 and count * req.n > MAX_N:
            raise APIError(400, f"{count} prompts with n={req.n} make {count * req.n} sequences, more than the "
                                f"{MAX_N} one request may have", param="prompt")
        self.check_model(req.model)

    def build_prompts(self, req: CompletionRequest) -> list[CompletionPrompt]:
        return [self.build_prompt(p, req) for p in req.prompts()]

    def build_prompt(self, prompt: str | list[int], req: CompletionRequest) -> CompletionPrompt:
        """Text is encoded with the bos the model expects (the tokenizer knows); token ids are used as they are,
        and the engine refuses ids outside the model's vocabulary."""
        if isinstance(prompt, str):
            return CompletionPrompt(self.tokenizer.encode(prompt, add_bos=True), prompt if req.echo else "")
        return CompletionPrompt(list(prompt), self.prompt_text(prompt, req) if req.echo else "")

    def prompt_text(self, token_ids: list[int], req: CompletionRequest) -> str:
        """The text of a token-id prompt, for echo."""
        try:
            return self.tokenizer.decode(token_ids, skip_special_tokens=req.skip_special_tokens)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from e

    async def submit_all(self, jobs: list[tuple[list[int], SamplingParams]]) -> list[RequestStream]:
        """Every prompt's request, or none: if one is refused, those already accepted are aborted."""
        try:
            self.engine.check_room(sum(params.n for _, params in jobs))  # all prompts' samples, not one's
        except QueueFullError as e:
            raise queue_full(e) from e
        streams: list[RequestStream] = []
        try:
            for token_ids, params in jobs:
                streams.append(await self.submit(token_ids, params, param="prompt"))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return streams

    def completion_body(self, finals: list[RequestOutput], prompts: list[CompletionPrompt], req: CompletionRequest,
                        response_id: str, created_at: int) -> dict[str, Any]:
        choices = []
        for p, (final, prompt) in enumerate(zip(finals, prompts)):
            scored = self.echoed_logprobs(final)  # the prompt's part, the same for each of its choices
            choices += [self.completion_choice(p * req.n + c.index, prompt.echo, c, scored) for c in final.outputs]
        return {"id": response_id, "object": "text_completion", "created": created_at, "model": req.model,
                "choices": choices, "usage": output_usage(finals)}

    def completion_choice(self, index: int, echo: str, c: CompletionOutput,
                          prompt_logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        logprobs = None
        if c.logprobs is not None:
            offset = len(echo) if prompt_logprobs is None else text_end(prompt_logprobs)  # counted as the tokens are
            logprobs = legacy_logprobs(self.tokenizer, c.token_ids, c.logprobs, c.top_logprobs, offset=offset)
        logprobs = joined_logprobs(prompt_logprobs, logprobs)
        return {"index": index, "text": echo + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}

    def echoed_logprobs(self, out: RequestOutput) -> dict[str, Any] | None:
        """The prompt's part of the logprobs of an echoed completion (echo with logprobs)."""
        if out.prompt_logprobs is None:
            return None
        return legacy_prompt_logprobs(self.tokenizer, out.prompt_token_ids, out.prompt_logprobs)
