"""What every generation endpoint shares (in the manner of vLLM's `OpenAIServing`): the model check, sampling
options and their validation, submission and its errors, collecting a whole answer, the SSE stream, and the
latency histograms each request feeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from tpa_model.sampling import ParamError, SamplingParams, StructuredOutput
from tpa_model.tokenizers.gemma_tokenizer import GemmaTokenizer

from ..engine.async_engine import AsyncEngine, EngineDeadError, EngineError, QueueFullError, RequestStream
from ..engine.engine import RequestOutput
from ..engine.structured import StructuredOutputError
from ..metrics import Metrics
from .protocol import (
    MAX_N,
    APIError,
    SamplingRequest,
    lone_surrogate_field,
    usage,
)
from .settings import ServerSettings
from .sse import SSE_HEADERS, SSEResponse, SSEWriter, sse


def output_usage(outs: list[RequestOutput]) -> dict[str, Any]:
    """Usage of a response's requests so far (one per prompt): n samples' tokens together, as OpenAI counts them."""
    prompt_tokens = sum(len(out.prompt_token_ids) for out in outs)
    completion_tokens = sum(len(c.token_ids) for out in outs for c in out.outputs)
    return usage(prompt_tokens, completion_tokens, sum(out.num_cached_tokens for out in outs))


def check_unsupported(req: SamplingRequest, names: tuple[str, ...]) -> None:
    """Fields we would otherwise silently ignore are refused, so a client never trusts an unmet option."""
    extra = req.model_extra or {}
    for name in names:
        if extra.get(name):
            raise APIError(400, f"{name} is not supported by this server", param=name)


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index of the stream, output) in the order they arrive; one stream is read directly, several through a
    queue that a task per stream fills. Closing this generator stops the tasks; the caller closes the streams."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    # Bounded, so a slow consumer leaves the outputs in their streams, which keep only the newest of each.
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))
    tasks = [asyncio.ensure_future(forward(i, stream, queue)) for i, stream in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                remaining -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def forward(i: int, stream: RequestStream, queue: asyncio.Queue) -> None:
    """The stream's outputs onto the shared queue, then None, or the exception that ended it."""
    try:
        async for out in stream:
            await queue.put((i, out))
        await queue.put((i, None))
    except Exception as e:
        await queue.put((i, e))


class OpenAIServing:
    """The OpenAI API over an AsyncEngine, what chat and text completions do alike: the model check, sampling
    options and their validation, submission, collecting a whole answer, and the SSE stream.

    It knows the model only through the AsyncEngine (vision_config, build_inputs, submit), never through
    the LLMEngine behind it, so the engine can change without the API following.
    """

    def __init__(self, engine: AsyncEngine, tokenizer: GemmaTokenizer, settings: ServerSettings,
                 metrics: Metrics | None = None):
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.metrics = metrics or Metrics(engine)

    def check_text(self, req: SamplingRequest) -> None:
        """Text a tokenizer cannot take, or that would take it long, is refused before it is tokenized: a lone
        surrogate (which UTF-8 cannot encode) names its field; the length limit is in characters."""
        bad = lone_surrogate_field(req.model_dump())
        if bad is not None:
            raise APIError(400, f"{bad} is not valid Unicode text: it holds a lone surrogate (U+D800 to U+DFFF)",
                           param=bad)
        limit = self.settings.max_text_chars
        longest = max(req.text_lengths(), default=0)
        if longest > limit:
            raise APIError(400, f"the {req.prompt_param} hold {longest} characters, more than the limit of "
                                f"{limit} (--max-text-chars)", param=req.prompt_param, code="text_too_long")

    def check_model(self, model: str) -> None:
        if model != self.settings.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.settings.model_name!r}", param="model", code="model_not_found")

    async def structured_output(self, req: SamplingRequest) -> StructuredOutput | None:
        """The request's output constraint, compiled in a worker thread (the first one reads the vocabulary, and
        a large schema takes a while), so that a bad one is a 400 naming its field."""
        asked = req.structured_output()
        if asked is None:
            return None
        field, spec = asked
        try:
            await asyncio.to_thread(self.engine.compile_structured, spec)
        except StructuredOutputError as e:
            raise APIError(400, f"{field} cannot be enforced: {e}", param=field) from e
        return spec

    def sampling_params(self, req: SamplingRequest, prompt_len: int,
                        structured: StructuredOutput | None = None) -> SamplingParams:
        """The request's sampling options, validated here so a bad one is a 400 naming its field."""
        params = SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=req.seed,
            max_tokens=self.max_tokens(req, prompt_len),
            stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            logprobs=req.logprob_count(),
            prompt_logprobs=req.prompt_logprob_count(),
            skip_special_tokens=req.skip_special_tokens,
            logit_bias=req.token_bias(),
            structured=structured,
        )
        self.check_params(req, params)
        return params

    def max_tokens(self, req: SamplingRequest, prompt_len: int) -> int:
        """The client's limit if it fits the context, else a 400 that says by how much; unset, the rest of it."""
        param, max_tokens = req.token_limit()
        limit = self.settings.max_model_len
        if max_tokens is None:
            if limit - prompt_len < 1:
                raise APIError(400, f"the prompt has {prompt_len} tokens, which fills the maximum model length "
                                    f"of {limit}", param=req.prompt_param)
            return limit - prompt_len
        if max_tokens < req.fewest_tokens():
            raise APIError(400, f"{param} must be at least {req.fewest_tokens()}, got {max_tokens} (0 only with "
                                "echo on /v1/completions: the prompt alone, scored with logprobs)", param=param)
        if prompt_len + max_tokens > limit:
            raise APIError(400, f"the prompt ({prompt_len} tokens) plus {param} ({max_tokens}) is "
                                f"{prompt_len + max_tokens} tokens, more than the maximum model length of "
                                f"{limit}", param=param, code="context_length_exceeded")
        return max_tokens

    def check_params(self, req: SamplingRequest, params: SamplingParams) -> None:
        """API-level limits first (they name the API's fields), then SamplingParams' own checks."""
        if req.n > MAX_N:
            raise APIError(400, f"n must be at most {MAX_N}, got {req.n}", param="n")
        self.check_fields(req)
        try:
            params.validate()
        except ParamError as e:
            raise APIError(400, str(e), param=e.param) from e

    def check_fields(self, req: SamplingRequest) -> None:
        """An endpoint's own rules on how its fields combine; none by default."""

    async def submit(self, prompt_ids: list[int], params: SamplingParams, pixel_values=None,
                     param: str | None = None) -> RequestStream:
        """Engine refusals as API errors: a full queue or a dead engine is our 503, the rest the client's 400
        (about `param`, when the endpoint knows which field the engine objected to)."""
        try:
            return await self.engine.submit(prompt_ids, params, pixel_values=pixel_values)
        except QueueFullError as e:
            raise queue_full(e) from e
        except EngineDeadError as e:
            raise APIError(503, "the engine is not running", type="server_error", code="engine_dead") from e
        except ParamError as e:
            raise APIError(400, str(e), param=e.param) from e
        except ValueError as e:
            raise APIError(400, str(e), param=param) from e

    async def collect(self, streams: list[RequestStream], request: Request,
                      timers: list[LatencyTimer]) -> list[RequestOutput] | None:
        """The final output of each stream; aborts them all if the client goes away first."""
        task = asyncio.ensure_future(self.consume(streams, timers))
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if not done and await request.is_disconnected():
                    task.cancel()
                    return None
            return task.result()
        except EngineError as e:
            raise engine_error(e) from e
        finally:
            for stream in streams:
                stream.close()

    @staticmethod
    async def consume(streams: list[RequestStream], timers: list[LatencyTimer]) -> list[RequestOutput | None]:
        """Every output is timed, though only each stream's last is answered."""
        last: list[RequestOutput | None] = [None] * len(streams)
        async with contextlib.aclosing(merged(streams)) as outputs:
            async for i, out in outputs:
                timers[i].observe(out)
                last[i] = out
        return last

    def streaming_response(self, streams: list[RequestStream], writer: SSEWriter, req: SamplingRequest,
                           timers: list[LatencyTimer]) -> StreamingResponse:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = self.stream_events(streams, writer, include_usage, timers)
        return SSEResponse(body, self.settings.stream_timeout, media_type="text/event-stream", headers=SSE_HEADERS)

    async def stream_events(self, streams: list[RequestStream], writer: SSEWriter, include_usage: bool,
                            timers: list[LatencyTimer]) -> AsyncIterator[str]:
        """SSE events ending in [DONE]. The 200 is already sent, so an engine death becomes an error event."""
        last: list[RequestOutput | None] = [None] * len(streams)
        try:
            for event in writer.opening():
                yield event
            async with contextlib.aclosing(merged(streams)) as outputs:
                async for i, out in outputs:
                    timers[i].observe(out)
                    last[i] = out
                    for event in writer.events(i, out):
                        yield event
            if include_usage and all(out is not None for out in last):
                yield writer.event([], usage=output_usage(last))
            yield "data: [DONE]\n\n"
        except EngineError as e:
            yield sse(engine_error(e).body())
        finally:
            for stream in streams:
                stream.close()


def queue_full(e: QueueFullError) -> APIError:
    return APIError(503, str(e), type="server_error", code="queue_full", headers={"Retry-After": "1"})


def engine_error(e: EngineError) -> APIError:
    """An engine failure after the request was accepted: the server's fault, a 500 (or an error event)."""
    if isinstance(e, EngineDeadError):
        return APIError(500, "the engine stopped while generating", type="server_error", code="engine_dead")
    return APIError(500, str(e), type="server_error", code="engine_error")


class LatencyTimer:
    """Feeds one request's TTFT, inter-token, end-to-end and queue times into the histograms."""

    def __init__(self, metrics: Metrics, arrival: float):
        self.metrics, self.arrival = metrics, arrival
        self.last_token: float | None = None
        self.tokens = 0

    def observe(self, out: RequestOutput) -> None:
        t = time.monotonic()
        tokens = sum(len(c.token_ids) for c in out.outputs)
        if tokens > self.tokens:
            if self.last_token is None:
                self.metrics.ttft.observe(t - self.arrival)
                if out.queue_seconds is not None:
                    self.metrics.queue.observe(out.queue_seconds)
            else:
                self.metrics.itl.observe(t - self.last_token)
            self.last_token, self.tokens = t, tokens
        if out.finished:
            self.metrics.e2e.observe(t - self.arrival)
