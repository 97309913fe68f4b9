"""The HTTP layer's guard, a pure ASGI middleware: request ids, the API key, and limits on request bodies.

It is plain ASGI on purpose. Starlette's `BaseHTTPMiddleware` (what `@app.middleware("http")` makes) runs the
app behind a channel of its own, so `request.is_disconnected()` never sees the client leave and a
non-streamed request would run to its end for nobody. Here `receive` and `send` are only wrapped, so a
disconnect reaches the route as it happens.

What it does for each HTTP request, in order:
- takes the client's `X-Request-ID` when it is sane (see `REQUEST_ID`), else makes one; it is sent back on
  every response and set in `request_id` for the request's log lines (see `install_log_record_factory`);
- answers 401 when `--api-key` is set and a guarded path (/v1/, and the API docs) lacks the key;
- answers 413 for a declared Content-Length over the limit, and stops a body that grows past it while read;
- gives the whole body `body_timeout` seconds to arrive, so a client that sends half a body and waits holds
  nothing for long (the answer is 408).
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # echoed only if it is this: no header or log injection
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class BodyError(HTTPException):
    """A request body refused while it is read (too large, or too slow). Raised from `receive`, so it is an
    HTTPException: FastAPI passes those on unchanged to the app's error handlers."""

    def __init__(self, status_code: int, detail: str, code: str):
        super().__init__(status_code=status_code, detail=detail)
        self.code = code


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}).encode()


@dataclass
class GuardSettings:
    api_key: str | None
    guarded_prefixes: tuple[str, ...]  # paths that need the key when one is set
    max_request_bytes: int
    body_timeout: float


class HTTPGuard:
    """See the module docstring."""

    def __init__(self, app, settings: GuardSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = client_request_id(scope) or uuid.uuid4().hex
        token = request_id.set(rid)
        sender = Sender(send, rid)
        try:
            await self.guarded(scope, receive, sender)
        finally:
            request_id.reset(token)

    async def guarded(self, scope: Scope, receive: Receive, sender: Sender) -> None:
        """The app's answer; an error it raised before answering is still a JSON answer with the request id
        (uvicorn's own would be plain text without it)."""
        refusal = self.refusal(scope)
        if refusal is not None:
            await sender.error(*refusal)
            return
        try:
            await self.app(scope, BodyReader(receive, self.settings).receive, sender.send)
        except asyncio.CancelledError:  # uvicorn's graceful-shutdown timeout ran out while we answered
            await sender.fail(503, error_body("the server is shutting down", "server_error", "shutting_down"))
            raise
        except Exception:
            log.exception("error while answering %s %s", scope["method"], scope["path"])
            await sender.fail(500, error_body("internal server error", "server_error", "internal_error"))

    def refusal(self, scope: Scope) -> tuple[int, bytes] | None:
        """(status, body) of an answer given before the app sees the request, or None."""
        s = self.settings
        if s.api_key and scope["path"].startswith(s.guarded_prefixes) and not key_matches(scope, s.api_key):
            return 401, error_body("invalid or missing API key", "authentication_error", "invalid_api_key")
        length = header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > s.max_request_bytes:
            return 413, too_large(s.max_request_bytes)
        return None


class BodyReader:
    """`receive` for one request: counts the body's bytes against the limit and gives the whole body one
    deadline. Once the body is complete it passes messages through untouched, so waiting for a disconnect
    (which may rightly take as long as the answer does) has no deadline."""

    def __init__(self, receive: Receive, settings: GuardSettings):
        self.inner, self.settings = receive, settings
        self.deadline = time.monotonic() + settings.body_timeout
        self.received = 0
        self.complete = False

    async def receive(self) -> Message:
        if self.complete:
            return await self.inner()
        try:
            message = await asyncio.wait_for(self.inner(), max(0.0, self.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise BodyError(408, f"the request body did not arrive within {self.settings.body_timeout:g} s",
                            "request_timeout") from None
        if message["type"] == "http.request":
            self.count(message)
        else:
            self.complete = True
        return message

    def count(self, message: Message) -> None:
        self.received += len(message.get("body", b""))
        if self.received > self.settings.max_request_bytes:
            limit = self.settings.max_request_bytes
            raise BodyError(413, f"the request body is larger than the limit of {limit} bytes",
                            "request_too_large")
        self.complete = not message.get("more_body", False)


def too_large(limit: int) -> bytes:
    return error_body(f"the request body is larger than the limit of {limit} bytes", "invalid_request_error",
                      "request_too_large")


class Sender:
    """`send` for one request: adds X-Request-ID to the response and remembers whether it has started, whether
    it is a stream of server-sent events, and whether its body is complete."""

    def __init__(self, send: Send, rid: str):
        self.inner, self.rid = send, rid
        self.started = self.streaming_events = self.finished = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
            self.streaming_events = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                        for k, v in headers)
            message = {**message, "headers": [*headers, (b"x-request-id", self.rid.encode())]}
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self.inner(message)

    async def fail(self, status: int, body: bytes) -> None:
        """The answer to a request the app could not finish: an error response if none has started; an error
        event that ends the stream (OpenAI's way) if a stream of events has, rather than cutting it silently."""
        if not self.started:
            await self.error(status, body)
        elif self.streaming_events and not self.finished:
            await self.send({"type": "http.response.body", "body": b"data: " + body + b"\n\n", "more_body": False})

    async def error(self, status: int, body: bytes) -> None:
        """An error answered here rather than by the app; the connection is closed, since the request's body
        may be unread."""
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> str | None:
    value = raw_header(scope, name)
    return None if value is None else value.decode("latin-1")


def raw_header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


def client_request_id(scope: Scope) -> str | None:
    value = header(scope, b"x-request-id")
    return value if value is not None and REQUEST_ID.fullmatch(value) else None


def key_matches(scope: Scope, api_key: str) -> bool:
    """Constant-time comparison, so response timing does not leak the key."""
    value = raw_header(scope, b"authorization") or b""
    token = value[7:] if value[:7].lower() == b"bearer " else b""
    return hmac.compare_digest(token, api_key.encode())


def install_log_record_factory() -> None:
    """Every log record gets `request_id`: the id of the request whose code wrote it, or "-". A record factory
    rather than a handler filter, so every handler (uvicorn's access log, a test's capture) sees it."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "adds_request_id", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = request_id.get()
        return record

    factory.adds_request_id = True
    logging.setLogRecordFactory(factory)
