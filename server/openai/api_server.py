"""The app: FastAPI routes for /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize,
/health and /metrics, the error handlers that answer in OpenAI's shape, and the OpenAPI document.

The serving classes do the work (in the manner of vLLM's entrypoints): `OpenAIServingChat`,
`OpenAIServingCompletion`, `OpenAIServingTokenization` and `OpenAIServingModels`. `create_app` only wires
routes, error handlers and the API-key middleware to them, so the serving logic can be read and tested without
FastAPI's decorators in the way.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from tpa_model.tokenizers.gemma_tokenizer import GemmaTokenizer

from ..engine.async_engine import AsyncEngine
from ..middleware import GuardSettings, HTTPGuard, install_log_record_factory
from .protocol import (
    APIError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    Health,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from .serving_chat import OpenAIServingChat
from .serving_completion import OpenAIServingCompletion
from .serving_models import OpenAIServingModels
from .serving_tokenization import OpenAIServingTokenization
from .settings import ServerSettings


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def create_app(engine: AsyncEngine, tokenizer: GemmaTokenizer, settings: ServerSettings) -> FastAPI:
    chat = OpenAIServingChat(engine, tokenizer, settings)
    completion = OpenAIServingCompletion(engine, tokenizer, settings, chat.metrics)  # one set of histograms
    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="gemma-tpa", version="0.1.0", lifespan=functools.partial(lifespan, engine, settings), **docs)
    add_error_handlers(app)
    app.add_middleware(HTTPGuard, settings=guard_settings(settings))
    install_log_record_factory()
    add_routes(app, Servings(chat, completion, OpenAIServingTokenization(chat), OpenAIServingModels(settings)))
    app.openapi = functools.partial(openapi_schema, app)
    app.state.engine = engine
    app.state.metrics = chat.metrics
    app.state.serving = chat
    app.state.serving_completion = completion
    return app


@contextlib.asynccontextmanager
async def lifespan(engine: AsyncEngine, settings: ServerSettings, _: FastAPI):
    """Run the engine while the app serves; on shutdown let open requests finish, within a limit."""
    engine.start()
    yield
    # uvicorn has stopped accepting and waited for open responses; finish or abort the rest
    await engine.drain(settings.drain_timeout)
    await engine.shutdown()


@dataclass
class Servings:
    """The serving class behind each route."""

    chat: OpenAIServingChat
    completion: OpenAIServingCompletion
    tokenization: OpenAIServingTokenization
    models: OpenAIServingModels


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


def add_routes(app: FastAPI, servings: Servings) -> None:
    """Thin routes: FastAPI reads each signature to parse the request, so they stay plain functions."""
    engine, metrics = servings.chat.engine, servings.chat.metrics

    @app.get("/health", responses={200: {"model": Health, "description": "the engine runs"},
                                   503: {"model": Health, "description": "the engine is not running"}})
    async def health():
        """503 once the engine thread has died, so an orchestrator restarts the container."""
        if engine.is_alive:
            return {"status": "ok"}
        return JSONResponse({"status": "dead"}, status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses={200: {"model": ModelList, "description": "the served model"},
                                      **error_responses(401)})
    async def models():
        return servings.models.show_models()

    @app.post("/v1/chat/completions", responses={**generation_ok(ChatCompletionResponse), **GENERATION_ERRORS})
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await servings.chat.create_chat_completion(req, request)

    @app.post("/v1/completions", responses={**generation_ok(CompletionResponse), **GENERATION_ERRORS})
    async def completions(req: CompletionRequest, request: Request):
        return await servings.completion.create_completion(req, request)

    @app.post("/tokenize", responses={200: {"model": TokenizeResponse, "description": "the token ids"},
                                      **error_responses(400, 401, 404, 408, 413)})
    async def tokenize(req: TokenizeRequest, request: Request):
        return await servings.tokenization.tokenize(req, request)

    @app.post("/detokenize", responses={200: {"model": DetokenizeResponse, "description": "the text"},
                                        **error_responses(400, 401, 404, 408, 413)})
    async def detokenize(req: DetokenizeRequest):
        return servings.tokenization.detokenize(req)


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
