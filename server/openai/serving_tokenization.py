"""/tokenize and /detokenize, as vLLM has them: a prompt's ids as /v1/completions makes them, or a chat's as the
chat endpoint renders it (through that endpoint's own checks and template), with the count and the model
length; ids back to text."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request

from .protocol import APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .serving_chat import OpenAIServingChat


class OpenAIServingTokenization:
    """Token ids in and out, through the chat endpoint's checks, so that a count here is the one a request
    there would have."""

    def __init__(self, chat: OpenAIServingChat):
        self.chat, self.tokenizer, self.settings = chat, chat.tokenizer, chat.settings

    async def tokenize(self, req: TokenizeRequest, request: Request) -> dict[str, Any]:
        """A prompt's ids as /v1/completions makes them, or a chat's as /v1/chat/completions does."""
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            chat = ChatCompletionRequest(model=req.model, messages=req.messages)
            self.chat.check_request(chat)
            ids = (await self.chat.build_prompt(chat, request)).token_ids
        else:
            text = CompletionRequest(model=req.model, prompt=req.prompt)
            self.chat.check_text(text)
            self.chat.check_model(text.model)
            ids = await asyncio.to_thread(self.tokenizer.encode, req.prompt, req.add_special_tokens)
        return {"count": len(ids), "max_model_len": self.settings.max_model_len, "tokens": ids}

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self.chat.check_model(req.model)
        try:
            return {"prompt": self.tokenizer.decode(req.tokens, skip_special_tokens=False)}
        except ValueError as e:
            raise APIError(400, str(e), param="tokens") from e
