"""Server-sent events: the response that gives up on a client that stops reading, and the writers that turn
engine outputs into one endpoint's chunks (chat.completion.chunk, text_completion).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

from fastapi.responses import StreamingResponse

from tpa_model.tokenizers.gemma_tokenizer import GemmaTokenizer

from ..engine.engine import CompletionOutput, RequestOutput
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    legacy_logprobs,
    legacy_prompt_logprobs,
    logprobs_content,
    text_end,
)

logger = logging.getLogger("gemma_tpa.api")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer the stream


def sse(body: dict[str, Any]) -> str:
    """One server-sent event; json.dumps never emits a newline, so the body cannot split the event."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class SSEResponse(StreamingResponse):
    """A streaming response that gives up on a client that stops reading: each write may wait at most
    `send_timeout` seconds for the client to make room (uvicorn's send blocks while the socket's buffer is
    full). Past that the request is aborted and the connection closed, instead of buffering its output."""

    def __init__(self, content, send_timeout: float, **kwargs):
        super().__init__(content, **kwargs)
        self.send_timeout = send_timeout

    async def stream_response(self, send) -> None:
        try:
            await asyncio.wait_for(send({"type": "http.response.start", "status": self.status_code,
                                         "headers": self.raw_headers}), self.send_timeout)
            async for chunk in self.body_iterator:
                body = {"type": "http.response.body", "body": chunk.encode(self.charset), "more_body": True}
                await asyncio.wait_for(send(body), self.send_timeout)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.TimeoutError:
            logger.warning("a streaming client read nothing for %.0f s; closing its connection", self.send_timeout)
        finally:
            await self.body_iterator.aclose()  # closes its streams, which aborts their requests


class SSEWriter:
    """The events of one streamed response; it remembers what each choice has sent, since engine outputs carry
    a choice's whole token list, not just the new tokens. Subclasses write one endpoint's chunks."""

    object_name = ""

    def __init__(self, tokenizer: GemmaTokenizer, req: SamplingRequest, response_id: str, created_at: int,
                 num_choices: int):
        self.tokenizer = tokenizer
        self.head = {"id": response_id, "object": self.object_name, "created": created_at, "model": req.model}
        self.sent_tokens = [0] * num_choices
        self.finished: set[int] = set()

    def event(self, choices: list, **extra) -> str:
        return sse({**self.head, "choices": choices, **extra})

    def opening(self) -> list[str]:
        """Events sent before any output."""
        return []

    def events(self, prompt: int, out: RequestOutput) -> Iterator[str]:
        """The events of one output of the request for prompt number `prompt`."""
        raise NotImplementedError


class ChunkWriter(SSEWriter):
    """The chat.completion.chunk events of one streamed chat response."""

    object_name = "chat.completion.chunk"

    def __init__(self, tokenizer: GemmaTokenizer, req: ChatCompletionRequest, response_id: str, created_at: int):
        super().__init__(tokenizer, req, response_id, created_at, req.n)
        self.n = req.n

    def opening(self) -> list[str]:
        """OpenAI's first chunk: every choice's role, with empty content."""
        return [self.event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for i in range(self.n)])]

    def events(self, prompt: int, out: RequestOutput) -> Iterator[str]:
        for c in out.outputs:
            yield from self.choice_events(c)

    def choice_events(self, c: CompletionOutput) -> Iterator[str]:
        """A delta if the choice has new text or logprobs, then its finish chunk: each choice ends as it finishes."""
        delta = self.delta(c)
        if delta is not None:
            yield delta
        self.sent_tokens[c.index] = len(c.token_ids)
        if c.finish_reason is not None and c.index not in self.finished:
            self.finished.add(c.index)
            yield self.event([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}])

    def delta(self, c: CompletionOutput) -> str | None:
        """None when there is nothing to send (e.g. a token still held back as a possible stop string)."""
        start = self.sent_tokens[c.index]
        new_ids = c.token_ids[start:]
        if not (c.delta_text or (new_ids and c.logprobs is not None)):
            return None
        choice = {"index": c.index, "delta": {"content": c.delta_text}, "logprobs": None, "finish_reason": None}
        if c.logprobs is not None:
            choice["logprobs"] = logprobs_content(self.tokenizer, new_ids, c.logprobs[start:], c.top_logprobs[start:])
        return self.event([choice])


class CompletionChunkWriter(SSEWriter):
    """The text_completion events of one streamed completion: each carries one choice's new text (and its
    logprobs), and the choice's finish_reason rides on its last event."""

    object_name = "text_completion"

    def __init__(self, tokenizer: GemmaTokenizer, req: CompletionRequest, response_id: str, created_at: int,
                 echoes: list[str]):
        super().__init__(tokenizer, req, response_id, created_at, len(echoes) * req.n)
        self.n, self.echoes = req.n, echoes
        self.offsets = [len(echo) for echo in echoes for _ in range(req.n)]  # text_offset of each choice's next token
        # echo with logprobs: a prompt's text goes out with its logprobs, once the engine has computed them
        self.unscored = set(range(len(echoes))) if req.prompt_logprob_count() is not None else set()

    def opening(self) -> list[str]:
        """With echo, every choice starts with its prompt's text."""
        return [event for p, echo in enumerate(self.echoes) if echo and p not in self.unscored
                for event in self.echo_events(p)]

    def echo_events(self, prompt: int, logprobs: dict[str, Any] | None = None) -> list[str]:
        """Each of the prompt's choices opens with its text (and, with logprobs, the prompt's logprobs)."""
        return [self.event([{"index": prompt * self.n + i, "text": self.echoes[prompt], "logprobs": logprobs,
                             "finish_reason": None}]) for i in range(self.n)]

    def events(self, prompt: int, out: RequestOutput) -> Iterator[str]:
        if prompt in self.unscored and out.prompt_logprobs is not None:
            self.unscored.remove(prompt)
            logprobs = legacy_prompt_logprobs(self.tokenizer, out.prompt_token_ids, out.prompt_logprobs)
            for i in range(self.n):
                self.offsets[prompt * self.n + i] = text_end(logprobs)
            yield from self.echo_events(prompt, logprobs)
        for c in out.outputs:
            event = self.choice_event(prompt * self.n + c.index, c)
            if event is not None:
                yield event

    def choice_event(self, index: int, c: CompletionOutput) -> str | None:
        """None when there is nothing to send (e.g. a token still held back as a possible stop string)."""
        start = self.sent_tokens[index]
        new_ids = c.token_ids[start:]
        self.sent_tokens[index] = len(c.token_ids)
        finish = None
        if c.finish_reason is not None and index not in self.finished:
            self.finished.add(index)
            finish = c.finish_reason
        with_logprobs = bool(new_ids) and c.logprobs is not None
        if not (c.delta_text or with_logprobs or finish):
            return None
        choice = {"index": index, "text": c.delta_text, "logprobs": None, "finish_reason": finish}
        if with_logprobs:
            choice["logprobs"] = legacy_logprobs(self.tokenizer, new_ids, c.logprobs[start:], c.top_logprobs[start:],
                                                 offset=self.offsets[index])
            self.offsets[index] += sum(len(token) for token in choice["logprobs"]["tokens"])
        return self.event([choice])
