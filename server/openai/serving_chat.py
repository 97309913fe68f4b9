"""The OpenAI chat-completions API: the chat template's input from the messages, images, and the responses,
whole or streamed.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from PIL import Image

from tpa_model.tokenizers.gemma_tokenizer import ChatTemplateError
from tpa_model.tokenizers.prompts import PromptInputs

from ..engine.engine import CompletionOutput, RequestOutput
from .images import ImageLoader
from .protocol import (
    UNSUPPORTED_FIELDS,
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    logprobs_content,
    new_id,
    now,
)
from .serving_engine import LatencyTimer, OpenAIServing, check_unsupported, output_usage
from .sse import ChunkWriter

# -- request -> chat template input ----------------------------------------------------------------------


def chat_messages(req: ChatCompletionRequest) -> tuple[list[dict], list[str]]:
    """The chat as the template takes it, and the image URLs of its image parts, in order."""
    urls: list[str] = []
    return [template_message(m, urls) for m in req.messages], urls


def template_message(m: ChatMessage, urls: list[str]) -> dict:
    """Gemma's template has no developer role; OpenAI's newer name for system maps back to system."""
    role = "system" if m.role == "developer" else m.role
    if m.content is None or isinstance(m.content, str):
        return {"role": role, "content": m.content or ""}
    return {"role": role, "content": [template_part(p, urls) for p in m.content]}


def template_part(part: ContentPart, urls: list[str]) -> dict:
    """A text part, or a bare image placeholder whose URL is collected for fetching."""
    if part.type == "text":
        return {"type": "text", "text": part.text or ""}
    if part.image_url is None:
        raise APIError(400, "image_url parts need an image_url.url", param="messages")
    urls.append(part.image_url.url)
    return {"type": "image"}


class OpenAIServingChat(OpenAIServing):
    """The OpenAI chat-completions API: chat template, images, responses."""

    async def create_chat_completion(self, req: ChatCompletionRequest, request: Request):
        """Refuse what we cannot honour before the engine sees it, then answer whole or as an SSE stream."""
        arrival = time.monotonic()
        self.check_request(req)
        structured = await self.structured_output(req)
        inputs = await self.build_prompt(req, request)
        params = self.sampling_params(req, len(inputs.token_ids), structured)
        stream = await self.submit(inputs.token_ids, params, inputs.pixel_values)
        response_id, created_at = new_id(), now()
        timer = LatencyTimer(self.metrics, arrival)
        if req.stream:
            writer = ChunkWriter(self.tokenizer, req, response_id, created_at)
            return self.streaming_response([stream], writer, req, [timer])
        finals = await self.collect([stream], request, [timer])
        if finals is None:
            return Response(status_code=499)
        return self.completion_body(finals[0], req, response_id, created_at)

    def check_request(self, req: ChatCompletionRequest) -> None:
        """Fields we would otherwise silently ignore are refused, so a client never trusts an unmet option."""
        self.check_text(req)
        check_unsupported(req, UNSUPPORTED_FIELDS)
        self.check_model(req.model)

    async def build_prompt(self, req: ChatCompletionRequest, request: Request) -> PromptInputs:
        """Token ids and pixels of the chat; the engine expands each image into its soft tokens. In a worker
        thread: tokenizing a long chat, or resizing images, must not block the event loop (and /health)."""
        messages, urls = chat_messages(req)
        images = await self.load_images(urls, request) if urls else []
        try:
            return await asyncio.to_thread(self.engine.build_inputs, messages, images)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from e

    async def load_images(self, urls: list[str], request: Request) -> list[Image.Image]:
        """Checked against the model first, so a text-only model never downloads anything."""
        if self.engine.vision_config is None:
            raise APIError(400, f"model {self.settings.model_name} does not read images", param="messages")
        return await self.image_loader.load(urls, request.is_disconnected)

    @functools.cached_property
    def image_loader(self) -> ImageLoader:
        """One per server: it bounds the remote fetches of all requests together."""
        return ImageLoader(self.settings.image_limits())

    def check_fields(self, req: ChatCompletionRequest) -> None:
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")

    def completion_body(self, final: RequestOutput, req: ChatCompletionRequest, response_id: str,
                        created_at: int) -> dict[str, Any]:
        choices = [self.completion_choice(c) for c in final.outputs]
        return {"id": response_id, "object": "chat.completion", "created": created_at, "model": req.model,
                "choices": choices, "usage": output_usage([final])}

    def completion_choice(self, c: CompletionOutput) -> dict[str, Any]:
        choice = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                  "logprobs": None, "finish_reason": c.finish_reason}
        if c.logprobs is not None:
            choice["logprobs"] = logprobs_content(self.tokenizer, c.token_ids, c.logprobs, c.top_logprobs)
        return choice
