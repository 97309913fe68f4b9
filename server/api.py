"""FastAPI routes: /v1/chat/completions (plain and streamed), /v1/models, /health, /metrics.

`OpenAIServingChat` does the work (in the manner of vLLM's class of that name); `create_app` only wires
routes, error handlers and the API-key middleware to it, so the serving logic can be read and tested
without FastAPI's decorators in the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tpa_model.image_processing import ImageError, load_image
from tpa_model.prompts import PromptInputs
from tpa_model.sampling import ParamError, SamplingParams
from tpa_model.tokenizer import ChatTemplateError, GemmaTokenizer

from .engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream
from .engine.engine import CompletionOutput, RequestOutput
from .images import fetch_image
from .metrics import Metrics
from .protocol import (
    UNSUPPORTED_FIELDS,
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    logprobs_content,
    new_id,
    now,
    usage,
)

MAX_N = 128  # samples per request: more would let one request crowd out every other
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer the stream


@dataclass
class ServerSettings:
    model_name: str
    max_model_len: int
    api_key: str | None = None
    allow_remote_images: bool = True
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 50_000_000
    image_fetch_timeout: float = 10.0
    drain_timeout: float = 30.0


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def sse(body: dict[str, Any]) -> str:
    """One server-sent event; json.dumps never emits a newline, so the body cannot split the event."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def output_usage(out: RequestOutput) -> dict[str, Any]:
    """Usage of a request so far: n samples' tokens together, as OpenAI counts them."""
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    return usage(len(out.prompt_token_ids), completion_tokens, out.num_cached_tokens)


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


# -- the serving class -----------------------------------------------------------------------------------


class OpenAIServingChat:
    """The OpenAI chat-completions API over an AsyncEngine: checks, prompt building, sampling, responses.

    It knows the model only through the AsyncEngine (vision_config, build_inputs, submit), never through
    the LLMEngine behind it, so the engine can change without the API following.
    """

    def __init__(self, engine: AsyncEngine, tokenizer: GemmaTokenizer, settings: ServerSettings):
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.metrics = Metrics(engine)
        self.created = now()

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
        inputs = await self.build_prompt(req)
        params = self.sampling_params(req, len(inputs.token_ids))
        stream = await self.submit(inputs, params)
        response_id, created_at = new_id(), now()
        timer = LatencyTimer(self.metrics, arrival)
        if req.stream:
            return self.streaming_response(stream, req, response_id, created_at, timer)
        final = await self.collect(stream, request, timer)
        if final is None:
            return Response(status_code=499)
        return self.completion_body(final, req, response_id, created_at)

    def check_request(self, req: ChatCompletionRequest) -> None:
        """Fields we would otherwise silently ignore are refused, so a client never trusts an unmet option."""
        extra = req.model_extra or {}
        for name in UNSUPPORTED_FIELDS:
            if extra.get(name):
                raise APIError(400, f"{name} is not supported by this server", param=name)
        fmt = extra.get("response_format")
        if fmt and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
            raise APIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")
        if req.model != self.settings.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{self.settings.model_name!r}", param="model", code="model_not_found")

    async def build_prompt(self, req: ChatCompletionRequest) -> PromptInputs:
        """Token ids and pixels of the chat; the engine expands each image into its soft tokens."""
        messages, urls = chat_messages(req)
        images = await self.load_images(urls) if urls else []
        try:
            return self.engine.build_inputs(messages, images)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from e

    async def load_images(self, urls: list[str]) -> list[Image.Image]:
        """Checked against the model first, so a text-only model never downloads anything."""
        if self.engine.vision_config is None:
            raise APIError(400, f"model {self.settings.model_name} does not read images", param="messages")
        blobs = await asyncio.gather(*(self.fetch_image(u) for u in urls))  # remote URLs: fetch concurrently
        try:
            return [load_image(b, max_pixels=self.settings.max_image_pixels) for b in blobs]
        except ImageError as e:
            raise APIError(400, str(e), param="messages", code=getattr(e, "code", None)) from e

    async def fetch_image(self, url: str) -> bytes:
        s = self.settings
        return await fetch_image(url, allow_remote=s.allow_remote_images, max_bytes=s.max_image_bytes,
                                 timeout=s.image_fetch_timeout)

    def sampling_params(self, req: ChatCompletionRequest, prompt_len: int) -> SamplingParams:
        """The request's sampling options, validated here so a bad one is a 400 naming its field."""
        params = SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty or 1.0,
            seed=req.seed,
            max_tokens=self.max_tokens(req, prompt_len),
            stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            skip_special_tokens=req.skip_special_tokens,
        )
        self.check_params(req, params)
        return params

    def max_tokens(self, req: ChatCompletionRequest, prompt_len: int) -> int:
        """The client's limit if it fits the context, else a 400 that says by how much; unset, the rest of it."""
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        limit = self.settings.max_model_len
        if max_tokens is None:
            if limit - prompt_len < 1:
                raise APIError(400, f"the prompt has {prompt_len} tokens, which fills the maximum model length "
                                    f"of {limit}", param="messages")
            return limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise APIError(400, f"the prompt ({prompt_len} tokens) plus {param} ({max_tokens}) is "
                                f"{prompt_len + max_tokens} tokens, more than the maximum model length of "
                                f"{limit}", param=param, code="context_length_exceeded")
        return max_tokens

    def check_params(self, req: ChatCompletionRequest, params: SamplingParams) -> None:
        """API-level limits first (they name the API's fields), then SamplingParams' own checks."""
        if req.n > MAX_N:
            raise APIError(400, f"n must be at most {MAX_N}, got {req.n}", param="n")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")
        try:
            params.validate()
        except ParamError as e:
            raise APIError(400, str(e), param=e.param) from e

    async def submit(self, inputs: PromptInputs, params: SamplingParams) -> RequestStream:
        """Engine refusals as API errors: a full queue or a dead engine is our 503, the rest the client's 400."""
        try:
            return await self.engine.submit(inputs.token_ids, params, pixel_values=inputs.pixel_values)
        except QueueFullError as e:
            raise APIError(503, str(e), type="server_error", code="queue_full", headers={"Retry-After": "1"}) from e
        except EngineDeadError as e:
            raise APIError(503, "the engine is not running", type="server_error", code="engine_dead") from e
        except ValueError as e:
            raise APIError(400, str(e)) from e

    async def collect(self, stream: RequestStream, request: Request, timer: LatencyTimer) -> RequestOutput | None:
        """The final output; aborts the request if the client goes away first."""
        task = asyncio.ensure_future(self.consume(stream, timer))
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if not done and await request.is_disconnected():
                    task.cancel()
                    return None
            return task.result()
        finally:
            stream.close()

    @staticmethod
    async def consume(stream: RequestStream, timer: LatencyTimer) -> RequestOutput | None:
        """Every output is timed, though only the last is answered."""
        last = None
        async for out in stream:
            timer.observe(out)
            last = out
        return last

    def completion_body(self, final: RequestOutput, req: ChatCompletionRequest, response_id: str,
                        created_at: int) -> dict[str, Any]:
        choices = [self.completion_choice(c) for c in final.outputs]
        return {"id": response_id, "object": "chat.completion", "created": created_at, "model": req.model,
                "choices": choices, "usage": output_usage(final)}

    def completion_choice(self, c: CompletionOutput) -> dict[str, Any]:
        choice = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                  "logprobs": None, "finish_reason": c.finish_reason}
        if c.logprobs is not None:
            choice["logprobs"] = logprobs_content(self.tokenizer, c.token_ids, c.logprobs, c.top_logprobs)
        return choice

    def streaming_response(self, stream: RequestStream, req: ChatCompletionRequest, response_id: str,
                           created_at: int, timer: LatencyTimer) -> StreamingResponse:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = self.stream_chunks(stream, req, response_id, created_at, include_usage, timer)
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)

    async def stream_chunks(self, stream: RequestStream, req: ChatCompletionRequest, response_id: str,
                            created_at: int, include_usage: bool, timer: LatencyTimer) -> AsyncIterator[str]:
        """SSE events ending in [DONE]. The 200 is already sent, so an engine death becomes an error event."""
        chunks = ChunkWriter(self.tokenizer, req, response_id, created_at)
        last = None
        try:
            yield chunks.opening()
            async for out in stream:
                timer.observe(out)
                last = out
                for event in chunks.events(out):
                    yield event
            if include_usage and last is not None:
                yield chunks.event([], usage=output_usage(last))
            yield "data: [DONE]\n\n"
        except EngineDeadError:
            err = APIError(500, "the engine stopped while generating", type="server_error", code="engine_dead")
            yield sse(err.body())
        finally:
            stream.close()


class ChunkWriter:
    """The chat.completion.chunk events of one streamed response; it remembers what each choice has sent,
    since engine outputs carry a choice's whole token list, not just the new tokens."""

    def __init__(self, tokenizer: GemmaTokenizer, req: ChatCompletionRequest, response_id: str, created_at: int):
        self.tokenizer = tokenizer
        self.head = {"id": response_id, "object": "chat.completion.chunk", "created": created_at, "model": req.model}
        self.n = req.n
        self.sent_tokens = [0] * req.n
        self.finished: set[int] = set()

    def event(self, choices: list, **extra) -> str:
        return sse({**self.head, "choices": choices, **extra})

    def opening(self) -> str:
        """OpenAI's first chunk: every choice's role, with empty content."""
        return self.event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None} for i in range(self.n)])

    def events(self, out: RequestOutput) -> Iterator[str]:
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


# -- wiring ----------------------------------------------------------------------------------------------


def create_app(engine: AsyncEngine, tokenizer: GemmaTokenizer, settings: ServerSettings) -> FastAPI:
    serving = OpenAIServingChat(engine, tokenizer, settings)
    app = FastAPI(title="gemma-tpa", version="0.1.0", lifespan=serving.lifespan)
    add_error_handlers(app)
    add_auth(app, settings)
    add_routes(app, serving)
    app.state.engine = engine
    app.state.metrics = serving.metrics
    app.state.serving = serving
    return app


def add_routes(app: FastAPI, serving: OpenAIServingChat) -> None:
    """Thin routes: FastAPI reads each signature to parse the request, so they stay plain functions."""

    @app.get("/health")
    async def health():
        return serving.health()

    @app.get("/metrics")
    async def prometheus():
        return serving.prometheus()

    @app.get("/v1/models")
    async def models():
        return serving.show_models()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await serving.create_chat_completion(req, request)


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, so SDK clients raise their typed exceptions."""
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)


async def api_error(_: Request, err: APIError) -> JSONResponse:
    return error_response(err)


async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(err))


def validation_error(err: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400, naming the first bad field the way OpenAI's `param` does."""
    first = err.errors()[0] if err.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    return APIError(400, message, param=param)


def add_auth(app: FastAPI, settings: ServerSettings) -> None:
    """The API key guards /v1/ only: health and metrics stay open to probes and scrapers."""

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if settings.api_key and request.url.path.startswith("/v1/") and not key_matches(request, settings.api_key):
            return error_response(APIError(401, "invalid or missing API key", type="authentication_error",
                                           code="invalid_api_key"))
        return await call_next(request)


def key_matches(request: Request, api_key: str) -> bool:
    """Constant-time comparison, so response timing does not leak the key."""
    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    return hmac.compare_digest(token.encode(), api_key.encode())


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
