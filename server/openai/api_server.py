"""FastAPI routes: /v1/chat/completions and /v1/completions (plain and streamed), /v1/models, /health, /metrics.

`OpenAIServingChat` and `OpenAIServingCompletion` do the work (in the manner of vLLM's classes of those names)
on a shared base, `OpenAIServing`, that holds what both endpoints do alike: the model check, sampling options
and their validation, submission and its errors, collecting a whole answer, and the SSE stream. `create_app`
only wires routes, error handlers and the API-key middleware to them, so the serving logic can be read and
tested without FastAPI's decorators in the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from tpa_model.sampling import ParamError, SamplingParams, StructuredOutput
from tpa_model.tokenizers.gemma_tokenizer import ChatTemplateError, GemmaTokenizer
from tpa_model.tokenizers.prompts import PromptInputs

from ..engine.async_engine import AsyncEngine, EngineDeadError, EngineError, QueueFullError, RequestStream
from ..engine.engine import CompletionOutput, RequestOutput
from ..engine.structured import StructuredOutputError
from ..metrics import Metrics
from ..middleware import GuardSettings, HTTPGuard, install_log_record_factory
from .images import ImageLimits, ImageLoader
from .protocol import (
    MAX_N,
    UNSUPPORTED_COMPLETION_FIELDS,
    UNSUPPORTED_FIELDS,
    APIError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ContentPart,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    Health,
    ModelList,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    joined_logprobs,
    legacy_logprobs,
    legacy_prompt_logprobs,
    logprobs_content,
    lone_surrogate_field,
    new_id,
    now,
    text_end,
    usage,
)

logger = logging.getLogger("gemma_tpa.api")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer the stream


@dataclass
class ServerSettings:
    model_name: str
    max_model_len: int
    api_key: str | None = None
    allow_remote_images: bool = True
    allow_private_image_urls: bool = False
    max_image_bytes: int = 20 << 20
    max_images_per_request: int = 8
    max_image_pixels: int = 50_000_000  # decoded pixels of all of a request's images together
    image_fetch_timeout: float = 10.0
    max_concurrent_image_fetches: int = 32
    drain_timeout: float = 30.0
    max_request_bytes: int = 32 << 20  # a request body, images in data URLs included
    max_text_chars: int = 1_000_000  # characters of a request's text (messages, or each prompt), before tokenizing
    body_timeout: float = 30.0  # seconds for a request's whole body to arrive
    docs: bool = True  # serve /docs, /redoc and /openapi.json (behind the API key when one is set)
    stream_timeout: float = 60.0  # seconds a streaming client may leave a write blocked before it is cut off

    def image_limits(self) -> ImageLimits:
        return ImageLimits(allow_remote=self.allow_remote_images, allow_private=self.allow_private_image_urls,
                           max_bytes=self.max_image_bytes, max_images=self.max_images_per_request,
                           max_pixels=self.max_image_pixels, fetch_timeout=self.image_fetch_timeout,
                           max_fetches=self.max_concurrent_image_fetches)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def sse(body: dict[str, Any]) -> str:
    """One server-sent event; json.dumps never emits a newline, so the body cannot split the event."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


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


# -- what every endpoint shares -------------------------------------------------------------------------


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
        self.created = now()

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


# -- chat completions ------------------------------------------------------------------------------------


class OpenAIServingChat(OpenAIServing):
    """The OpenAI chat-completions API: chat template, images, responses; also the app's lifespan and its
    small routes (health, metrics, models)."""

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI):
        """Run the engine while the app serves; on shutdown let open requests finish, within a limit."""
        self.engine.start()
        yield
        # uvicorn has stopped accepting and waited for open responses; finish or abort the rest
        await self.engine.drain(self.settings.drain_timeout)
        await self.engine.shutdown()

    # -- small routes -------------------------------------------------------------------------------------

    def health(self) -> dict | JSONResponse:
        """503 once the engine thread has died, so an orchestrator restarts the container."""
        if self.engine.is_alive:
            return {"status": "ok"}
        return JSONResponse({"status": "dead"}, status_code=503)

    def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def show_models(self) -> dict[str, Any]:
        card = {"id": self.settings.model_name, "object": "model", "created": self.created,
                "owned_by": "gemma-tpa", "max_model_len": self.settings.max_model_len}
        return {"object": "list", "data": [card]}

    # -- chat completions ---------------------------------------------------------------------------------

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

    async def tokenize(self, req: TokenizeRequest, request: Request) -> dict[str, Any]:
        """A prompt's ids as /v1/completions makes them, or a chat's as this endpoint does."""
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            chat = ChatCompletionRequest(model=req.model, messages=req.messages)
            self.check_request(chat)
            ids = (await self.build_prompt(chat, request)).token_ids
        else:
            text = CompletionRequest(model=req.model, prompt=req.prompt)
            self.check_text(text)
            self.check_model(text.model)
            ids = await asyncio.to_thread(self.tokenizer.encode, req.prompt, req.add_special_tokens)
        return {"count": len(ids), "max_model_len": self.settings.max_model_len, "tokens": ids}

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        try:
            return {"prompt": self.tokenizer.decode(req.tokens, skip_special_tokens=False)}
        except ValueError as e:
            raise APIError(400, str(e), param="tokens") from e

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


# -- text completions ------------------------------------------------------------------------------------


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


def queue_full(e: QueueFullError) -> APIError:
    return APIError(503, str(e), type="server_error", code="queue_full", headers={"Retry-After": "1"})


def engine_error(e: EngineError) -> APIError:
    """An engine failure after the request was accepted: the server's fault, a 500 (or an error event)."""
    if isinstance(e, EngineDeadError):
        return APIError(500, "the engine stopped while generating", type="server_error", code="engine_dead")
    return APIError(500, str(e), type="server_error", code="engine_error")


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


# -- SSE writers -----------------------------------------------------------------------------------------


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


# -- wiring ----------------------------------------------------------------------------------------------


def create_app(engine: AsyncEngine, tokenizer: GemmaTokenizer, settings: ServerSettings) -> FastAPI:
    serving = OpenAIServingChat(engine, tokenizer, settings)
    completion = OpenAIServingCompletion(engine, tokenizer, settings, serving.metrics)  # one set of histograms
    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="gemma-tpa", version="0.1.0", lifespan=serving.lifespan, **docs)
    add_error_handlers(app)
    app.add_middleware(HTTPGuard, settings=guard_settings(settings))
    install_log_record_factory()
    add_routes(app, serving, completion)
    app.openapi = functools.partial(openapi_schema, app)
    app.state.engine = engine
    app.state.metrics = serving.metrics
    app.state.serving = serving
    app.state.serving_completion = completion
    return app


def guard_settings(settings: ServerSettings) -> GuardSettings:
    """The API key guards /v1/ and the API docs; health and metrics stay open to probes and scrapers."""
    guarded = ("/v1/", "/docs", "/redoc", "/openapi.json") if settings.docs else ("/v1/",)
    return GuardSettings(api_key=settings.api_key, guarded_prefixes=guarded,
                         max_request_bytes=settings.max_request_bytes, body_timeout=settings.body_timeout)


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI declarations of the error answers a route gives, all in OpenAI's shape."""
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


ERROR_DESCRIPTIONS = {
    400: "invalid request: the error's `param` names the field",
    401: "missing or wrong API key (only with --api-key)",
    404: "unknown model",
    408: "the request body did not arrive in time",
    413: "the request body is larger than --max-request-bytes",
    500: "the engine failed while generating",
    503: "the waiting queue is full (see Retry-After), or the engine is not running",
}
GENERATION_ERRORS = error_responses(400, 401, 404, 408, 413, 500, 503)


def generation_ok(model: type) -> dict[int | str, dict]:
    """The 200 of a generation route: `model` as JSON, or with `stream` server-sent events."""
    return {200: {"model": model, "description": "the completion as JSON, or with `stream` as server-sent events",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document without the 422 it declares for every body (this server answers 400 instead), and
    with the events of the streamed answers described."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        describe_events(schema)
        app.openapi_schema = schema
    return app.openapi_schema


STREAM_CHUNKS = {"/v1/chat/completions": ChatCompletionChunk, "/v1/completions": CompletionChunk}


def describe_events(schema: dict[str, Any]) -> None:
    """Each server-sent event of a streamed answer: `data:` holds a chunk as JSON, an error in OpenAI's shape
    (an error after the 200 was sent), or the closing `[DONE]`."""
    _, defs = models_json_schema([(model, "serialization") for model in STREAM_CHUNKS.values()],
                                 ref_template="#/components/schemas/{model}")
    schema["components"]["schemas"].update(defs["$defs"])
    for path, model in STREAM_CHUNKS.items():
        payload = {"anyOf": [{"$ref": f"#/components/schemas/{model.__name__}"},
                             {"$ref": "#/components/schemas/ErrorResponse"}]}
        data = {"anyOf": [{"type": "string", "const": "[DONE]"},
                          {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}
        event = {"type": "object", "required": ["data"], "properties": {"data": data}}
        schema["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"] = event


def add_routes(app: FastAPI, serving: OpenAIServingChat, completion: OpenAIServingCompletion) -> None:
    """Thin routes: FastAPI reads each signature to parse the request, so they stay plain functions."""

    @app.get("/health", responses={200: {"model": Health, "description": "the engine runs"},
                                   503: {"model": Health, "description": "the engine is not running"}})
    async def health():
        return serving.health()

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus():
        return serving.prometheus()

    @app.get("/v1/models", responses={200: {"model": ModelList, "description": "the served model"},
                                      **error_responses(401)})
    async def models():
        return serving.show_models()

    @app.post("/v1/chat/completions", responses={**generation_ok(ChatCompletionResponse), **GENERATION_ERRORS})
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await serving.create_chat_completion(req, request)

    @app.post("/v1/completions", responses={**generation_ok(CompletionResponse), **GENERATION_ERRORS})
    async def completions(req: CompletionRequest, request: Request):
        return await completion.create_completion(req, request)

    @app.post("/tokenize", responses={200: {"model": TokenizeResponse, "description": "the token ids"},
                                      **error_responses(400, 401, 404, 408, 413)})
    async def tokenize(req: TokenizeRequest, request: Request):
        return await serving.tokenize(req, request)

    @app.post("/detokenize", responses={200: {"model": DetokenizeResponse, "description": "the text"},
                                        **error_responses(400, 401, 404, 408, 413)})
    async def detokenize(req: DetokenizeRequest):
        return serving.detokenize(req)


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, so SDK clients raise their typed exceptions; Starlette's own (404, 405,
    an unreadable body) too, never {"detail": ...}."""
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)


async def api_error(_: Request, err: APIError) -> JSONResponse:
    return error_response(err)


async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(err))


async def http_error(_: Request, err: HTTPException) -> JSONResponse:
    return error_response(starlette_error(err))


def starlette_error(err: HTTPException) -> APIError:
    """Starlette's and FastAPI's HTTP errors, and the middleware's BodyError, as OpenAI errors."""
    message = str(err.detail)
    code = getattr(err, "code", None) or HTTP_CODES.get(err.status_code)
    if message == "There was an error parsing the body":  # FastAPI's words for a body that is not UTF-8 JSON
        message, code = "the request body is not valid JSON text in UTF-8", "invalid_json"
    kind = "server_error" if err.status_code >= 500 else "invalid_request_error"
    return APIError(err.status_code, message, type=kind, code=code, headers=err.headers)


HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def validation_error(err: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400, naming the first bad field the way OpenAI's `param` does."""
    first = err.errors()[0] if err.errors() else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {detail}", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if param is None and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return APIError(400, "the request body must be a JSON object")
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    return APIError(400, message, param=param)


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
