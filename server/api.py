"""FastAPI routes: /v1/chat/completions (plain and streamed), /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tpa_model.image_processing import ImageError, ImageProcessorConfig, load_image, preprocess
from tpa_model.prompts import encode_chat_with_images
from tpa_model.sampling import ParamError, SamplingParams
from tpa_model.tokenizer import ChatTemplateError, GemmaTokenizer

from .engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from .engine.engine import RequestOutput
from .images import fetch_image
from .metrics import Metrics
from .protocol import (
    UNSUPPORTED_FIELDS,
    APIError,
    ChatCompletionRequest,
    logprobs_content,
    new_id,
    now,
    usage,
)

MAX_N = 128  # samples per request: more would let one request crowd out every other


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


def create_app(engine: AsyncEngine, tokenizer: GemmaTokenizer, settings: ServerSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        # uvicorn has stopped accepting and waited for open responses; finish or abort the rest
        await engine.drain(settings.drain_timeout)
        await engine.shutdown()

    app = FastAPI(title="gemma-tpa", version="0.1.0", lifespan=lifespan)
    metrics = Metrics(engine)
    model = engine.engine.model
    created = now()

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        return error_response(APIError(400, message, param=param))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if settings.api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
                return error_response(APIError(401, "invalid or missing API key", type="authentication_error",
                                               code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        if engine.is_alive:
            return {"status": "ok"}
        return JSONResponse({"status": "dead"}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        card = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "gemma-tpa",
                "max_model_len": settings.max_model_len}
        return {"object": "list", "data": [card]}

    async def build_prompt(req: ChatCompletionRequest) -> tuple[list[int], Any]:
        messages, urls = [], []
        for m in req.messages:
            role = "system" if m.role == "developer" else m.role
            if m.content is None or isinstance(m.content, str):
                messages.append({"role": role, "content": m.content or ""})
                continue
            parts = []
            for part in m.content:
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text or ""})
                else:
                    if part.image_url is None:
                        raise APIError(400, "image_url parts need an image_url.url", param="messages")
                    urls.append(part.image_url.url)
                    parts.append({"type": "image"})
            messages.append({"role": role, "content": parts})
        pixel_values, crops = None, None
        if urls:
            vision = model.vision_config
            if vision is None:
                raise APIError(400, f"model {settings.model_name} does not read images", param="messages")
            blobs = await asyncio.gather(*(fetch_image(
                u, allow_remote=settings.allow_remote_images, max_bytes=settings.max_image_bytes,
                timeout=settings.image_fetch_timeout) for u in urls))
            try:
                images = [load_image(b, max_pixels=settings.max_image_pixels) for b in blobs]
            except ImageError as e:
                raise APIError(400, str(e), param="messages", code=getattr(e, "code", None)) from e
            pixel_values, crops = preprocess(images, ImageProcessorConfig(image_size=vision.image_size))
        try:
            if pixel_values is None:
                return tokenizer.encode_chat(messages), None
            per_image = model.vision_config.mm_tokens_per_image
            return encode_chat_with_images(tokenizer, messages, per_image, crops), pixel_values
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from e

    def sampling_params(req: ChatCompletionRequest, prompt_len: int) -> SamplingParams:
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if max_tokens is None:
            max_tokens = settings.max_model_len - prompt_len
            if max_tokens < 1:
                raise APIError(400, f"the prompt has {prompt_len} tokens, which fills the maximum model length "
                                    f"of {settings.max_model_len}", param="messages")
        elif prompt_len + max_tokens > settings.max_model_len:
            raise APIError(400, f"the prompt ({prompt_len} tokens) plus {param} ({max_tokens}) is "
                                f"{prompt_len + max_tokens} tokens, more than the maximum model length of "
                                f"{settings.max_model_len}", param=param, code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
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
            max_tokens=max_tokens,
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            skip_special_tokens=req.skip_special_tokens,
        )
        if req.n > MAX_N:
            raise APIError(400, f"n must be at most {MAX_N}, got {req.n}", param="n")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")
        try:
            params.validate()
        except ParamError as e:
            raise APIError(400, str(e), param=e.param) from e
        return params

    def check_request(req: ChatCompletionRequest) -> None:
        extra = req.model_extra or {}
        for name in UNSUPPORTED_FIELDS:
            if extra.get(name):
                raise APIError(400, f"{name} is not supported by this server", param=name)
        fmt = extra.get("response_format")
        if fmt and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
            raise APIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")
        if req.model != settings.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{settings.model_name!r}", param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        arrival = time.monotonic()
        check_request(req)
        prompt_ids, pixel_values = await build_prompt(req)
        params = sampling_params(req, len(prompt_ids))
        try:
            stream = await engine.submit(prompt_ids, params, pixel_values=pixel_values)
        except QueueFullError as e:
            raise APIError(503, str(e), type="server_error", code="queue_full", headers={"Retry-After": "1"}) from e
        except EngineDeadError as e:
            raise APIError(503, "the engine is not running", type="server_error", code="engine_dead") from e
        except ValueError as e:
            raise APIError(400, str(e)) from e
        response_id, created_at = new_id(), now()
        timer = LatencyTimer(metrics, arrival)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = stream_chunks(stream, req, response_id, created_at, include_usage, timer)
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        final = await collect(stream, request, timer)
        if final is None:
            return Response(status_code=499)
        return completion_body(final, req, response_id, created_at)

    async def collect(stream, request: Request, timer: LatencyTimer) -> RequestOutput | None:
        """The final output; aborts the request if the client goes away first."""

        async def consume() -> RequestOutput:
            last = None
            async for out in stream:
                timer.observe(out)
                last = out
            return last

        task = asyncio.ensure_future(consume())
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if not done and await request.is_disconnected():
                    task.cancel()
                    return None
            return task.result()
        finally:
            stream.close()

    def completion_body(final: RequestOutput, req, response_id: str, created_at: int) -> dict[str, Any]:
        choices = []
        for c in final.outputs:
            choice = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                      "logprobs": None, "finish_reason": c.finish_reason}
            if c.logprobs is not None:
                choice["logprobs"] = logprobs_content(tokenizer, c.token_ids, c.logprobs, c.top_logprobs)
            choices.append(choice)
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        return {"id": response_id, "object": "chat.completion", "created": created_at, "model": req.model,
                "choices": choices, "usage": usage(len(final.prompt_token_ids), completion_tokens,
                                                   final.num_cached_tokens)}

    async def stream_chunks(stream, req, response_id: str, created_at: int, include_usage: bool,
                            timer: LatencyTimer) -> AsyncIterator[str]:
        def chunk(choices: list, **extra) -> str:
            body = {"id": response_id, "object": "chat.completion.chunk", "created": created_at,
                    "model": req.model, "choices": choices, **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        sent_tokens = [0] * req.n
        finished: set[int] = set()
        last = None
        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(req.n)])
            async for out in stream:
                timer.observe(out)
                last = out
                for c in out.outputs:
                    new_ids = c.token_ids[sent_tokens[c.index]:]
                    if c.delta_text or (new_ids and c.logprobs is not None):
                        choice = {"index": c.index, "delta": {"content": c.delta_text}, "logprobs": None,
                                  "finish_reason": None}
                        if c.logprobs is not None:
                            start = sent_tokens[c.index]
                            choice["logprobs"] = logprobs_content(tokenizer, new_ids, c.logprobs[start:],
                                                                  c.top_logprobs[start:])
                        yield chunk([choice])
                    sent_tokens[c.index] = len(c.token_ids)
                    if c.finish_reason is not None and c.index not in finished:  # each choice ends as it finishes
                        finished.add(c.index)
                        yield chunk([{"index": c.index, "delta": {}, "logprobs": None,
                                      "finish_reason": c.finish_reason}])
            if include_usage and last is not None:
                completion_tokens = sum(len(c.token_ids) for c in last.outputs)
                yield chunk([], usage=usage(len(last.prompt_token_ids), completion_tokens, last.num_cached_tokens))
            yield "data: [DONE]\n\n"
        except EngineDeadError:
            err = APIError(500, "the engine stopped while generating", type="server_error", code="engine_dead")
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            stream.close()

    app.state.engine = engine
    app.state.metrics = metrics
    return app


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
