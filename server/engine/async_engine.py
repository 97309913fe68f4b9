"""The asyncio front of the engine: one thread runs the blocking LLMEngine, coroutines stream its outputs.

The LLMEngine is not thread-safe and `step()` is blocking compute, so a single background thread owns it.
Coroutines never touch the engine's request state: they put commands (add, abort) on a lock-guarded queue
and wake the thread. The thread applies pending commands, runs `step()` while any request has work, and
sleeps on a condition variable when there is none (no busy spin). Each output goes back to the event loop
with `loop.call_soon_threadsafe` into the request's own `asyncio.Queue`.

Errors: `add_request` errors (ValueError, CapacityError, ParamError) are sent back to the one request that
caused them. A request that a step could not compute (the engine isolates it and goes on) ends its stream
with RequestFailedError. An exception escaping `step()` is fatal: it is kept as `fatal_error`, every open
request fails with EngineDeadError, later submissions fail with EngineDeadError at once, and `on_death`
(if set) is called on the event loop so the server can exit and be restarted.

Memory: a stream holds at most one output its consumer has not taken. A newer output replaces it and
carries the replaced one's text and token deltas, so a consumer that reads slowly gets fewer, larger deltas,
and the memory a stream holds is one output's, however far behind its consumer is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from tpa_model.sampling import SamplingParams, StructuredOutput

from .engine import CompletionOutput, LLMEngine, RequestOutput

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the server should answer 503 and let the client retry."""


class EngineError(RuntimeError):
    """The engine could not finish a request: the base of what a RequestStream may raise after acceptance."""


class RequestFailedError(EngineError):
    """A step failed this request (and only it); `cause` is the error the engine caught."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause
        self.__cause__ = cause


class EngineDeadError(EngineError):
    """The engine thread is gone (a step failed, or the engine was shut down); `cause` is the step's error."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause
        self.__cause__ = cause


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics. Sequence counts count each of a request's n samples."""

    num_running: int  # sequences holding cache blocks
    num_waiting: int  # sequences queued in the scheduler (new or preempted)
    num_pending: int  # sequences submitted but not yet handed to the engine thread
    num_in_flight: int  # requests whose stream is still open
    block_usage: dict[str, tuple[int, int]]  # cache pool -> (used, total) blocks
    num_preemptions: int
    prefix_cache_hits: int  # blocks served from the prefix cache, summed over pools
    num_prompt_tokens: int
    num_generated_tokens: int
    is_alive: bool


# -- commands (event loop -> engine thread) -------------------------------------------------------------


@dataclass
class _Add:
    stream: RequestStream
    prompt_ids: list[int]
    params: SamplingParams
    pixel_values: torch.Tensor | None = None


@dataclass
class _Abort:
    request_id: str


_ACCEPTED = object()  # first queue item of a request the engine took


def coalesce(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """`newer` carrying the deltas of `older`, which its consumer never took. Everything else in an output is
    cumulative, so the newer one alone, with the deltas joined, tells the consumer all that the two did."""
    before = {c.index: c for c in older.outputs}
    outputs = []
    for c in newer.outputs:
        old = before.get(c.index)
        if old is not None:
            c = dataclasses.replace(c, delta_text=old.delta_text + c.delta_text,
                                    delta_token_ids=old.delta_token_ids + c.delta_token_ids)
        outputs.append(c)
    return dataclasses.replace(newer, outputs=outputs)


class RequestStream:
    """The outputs of one request, in order, ending with a finished output or an exception.

    Iterate with `async for`. Call `close()` when done early: it aborts the request in the engine.
    Must be used on the event loop the AsyncEngine is bound to.
    """

    def __init__(self, owner: AsyncEngine, request_id: str, prompt_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self._owner = owner
        self._prompt_ids = prompt_ids
        self._n = params.n
        self._items: deque = deque()  # at most: _ACCEPTED, one output, and the final output or error
        self._ready = asyncio.Event()
        self._last: RequestOutput | None = None  # newest output received, to build an abort output from
        self.done = False  # the last item is queued; the engine will send nothing more
        self._exhausted = False  # the consumer has taken the last item

    # Called on the event loop thread only (directly, or via call_soon_threadsafe from the engine thread).
    def _put(self, item: object) -> None:
        if self.done:
            return  # e.g. an output that crossed an abort; the stream has already ended
        if isinstance(item, RequestOutput):
            self._last = item
            if self._items and isinstance(self._items[-1], RequestOutput):
                item = coalesce(self._items.pop(), item)
        if isinstance(item, BaseException) or (isinstance(item, RequestOutput) and item.finished):
            self._end()
        self._items.append(item)
        self._ready.set()

    async def _get(self) -> object:
        """The oldest item; one consumer at a time."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def _end(self) -> None:
        self.done = True
        self._owner._forget(self)

    def _abort_output(self) -> RequestOutput:
        """A final output for an aborted request: what it had produced, finish_reason "abort" where unfinished."""
        if self._last is None:
            outputs = [CompletionOutput(index=i, text="", token_ids=[], finish_reason="abort") for i in range(self._n)]
            return RequestOutput(self.request_id, self._prompt_ids, outputs, finished=True)
        outputs = [
            CompletionOutput(o.index, o.text, list(o.token_ids), o.finish_reason or "abort",
                             logprobs=o.logprobs, top_logprobs=o.top_logprobs)
            for o in self._last.outputs
        ]
        return RequestOutput(self.request_id, self._prompt_ids, outputs, True, self._last.num_cached_tokens)

    async def _accepted(self) -> None:
        """Wait for the engine thread to take the request; raise the error `add_request` raised."""
        item = await self._get()
        if isinstance(item, BaseException):
            self._exhausted = True
            raise item
        if item is not _ACCEPTED:  # aborted before the engine saw it: keep the abort output for the consumer
            self._items.appendleft(item)  # nothing else can be queued after a final item

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._exhausted:
            raise StopAsyncIteration
        item = await self._get()
        if isinstance(item, BaseException):
            self._exhausted = True
            raise item
        if item.finished:
            self._exhausted = True
        return item

    def close(self) -> None:
        """Stop consuming; aborts the request in the engine if it has not ended."""
        self._exhausted = True
        if not self.done:
            self._owner.abort(self.request_id)


class AsyncEngine:
    """Runs an LLMEngine on a background thread and streams its outputs to asyncio coroutines.

    Methods are meant for the event loop thread the engine is bound to (by `start()` or the first
    `submit()`), except `stop()` and `stats()`, which any thread may call.
    """

    def __init__(self, engine: LLMEngine, max_waiting: int | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.fatal_error: BaseException | None = None
        self.on_death = None  # called on the event loop once the engine thread has died (not on a clean stop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()  # guards the fields below
        self._commands: deque[_Add | _Abort] = deque()
        self._pending_seqs = 0  # sequences in queued _Add commands
        self._stop_requested = False
        self._closed = False  # the thread has stopped (or will never run): no more submissions
        # Event loop side only:
        self._streams: dict[str, RequestStream] = {}  # requests that may still get outputs
        self._idle: asyncio.Event | None = None
        # Engine thread only:
        self._live: dict[str, RequestStream] = {}

    # -- lifecycle --------------------------------------------------------------------------------------

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._idle = asyncio.Event()
            self._idle.set()
        elif self._loop is not loop:
            raise RuntimeError("this AsyncEngine is bound to a different event loop")
        return loop

    def start(self) -> None:
        """Bind to the running event loop and start the engine thread. Requests submitted before run now."""
        self._bind_loop()
        if self._thread is not None:
            raise RuntimeError("the engine thread was already started")
        with self._cond:
            if self._closed:
                raise EngineDeadError("the engine has been shut down", self.fatal_error)
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    def _request_stop(self) -> bool:
        """Ask the thread to stop; True if it runs and must be joined."""
        with self._cond:
            self._stop_requested = True
            self._cond.notify()
            if self._thread is None and not self._closed:  # never started: fail queued requests here
                self._closed = True
                pending = self._take_adds()
                self._fail([c.stream for c in pending], EngineDeadError("the engine has been shut down"))
        return self._thread is not None

    def stop(self, timeout: float | None = None) -> None:
        """Stop the engine thread and wait for it; every open request is aborted and fails with EngineDeadError.

        Blocks for up to one step; from a coroutine use `await shutdown()` instead.
        """
        if self._request_stop():
            self._thread.join(timeout)

    async def shutdown(self, timeout: float | None = None) -> None:
        """`stop()` without blocking the event loop."""
        if self._request_stop():
            await asyncio.to_thread(self._thread.join, timeout)

    # -- what the front needs to know of the model ------------------------------------------------------

    @property
    def vision_config(self):
        """The model's vision config, or None for a text-only model."""
        return self.engine.vision_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def build_inputs(self, messages: list[dict], images=(), pan_and_scan: bool = False):
        """Prompt ids and pixels of a chat (see LLMEngine.build_inputs); safe on any thread (it only reads the
        tokenizer and the vision config), so the API runs it in a worker thread."""
        return self.engine.build_inputs(messages, images, pan_and_scan)

    def compile_structured(self, spec: StructuredOutput) -> None:
        """Compile an output constraint ahead of its request (StructuredOutputError if it is invalid); safe on
        any thread, so the API runs it in a worker thread and the engine's loop finds it compiled."""
        self.engine.structured.compile(spec)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.fatal_error is None

    # -- requests ---------------------------------------------------------------------------------------

    def check_room(self, num_seqs: int) -> None:
        """Raise QueueFullError if num_seqs more sequences would take the waiting queue past max_waiting: each
        of a request's n samples waits as a sequence of its own, so n counts, not the request."""
        if self.max_waiting is None:
            return
        with self._cond:
            # len() of the scheduler's deque races only with step(), benignly; commands are applied
            # under this lock, so a request is never counted twice or missed between pending and waiting.
            waiting = len(self.engine.scheduler.waiting) + self._pending_seqs
        if waiting + num_seqs > self.max_waiting:
            raise QueueFullError(f"{waiting} sequences are waiting and this request adds {num_seqs} (limit "
                                 f"{self.max_waiting}); retry later")

    async def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> RequestStream:
        """Hand a request to the engine and wait until it is accepted; returns its output stream.

        Raises at once: QueueFullError (max_waiting reached), EngineDeadError, ValueError (a duplicate request
        id). Raises after the engine thread's check: whatever `add_request` raised (ValueError for bad token
        ids, images or lengths / ParamError / CapacityError). The caller must close() the stream if it stops early;
        `generate` does that for you.
        """
        self._bind_loop()
        request_id = request_id if request_id is not None else f"req-{uuid.uuid4().hex}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids = list(prompt_ids)
        stream = RequestStream(self, request_id, prompt_ids, params)
        with self._cond:
            if self._closed or self._stop_requested:
                raise EngineDeadError(
                    "the engine died" if self.fatal_error else "the engine has been shut down", self.fatal_error
                )
            self.check_room(params.n)
            self._commands.append(_Add(stream, prompt_ids, params, pixel_values))
            self._pending_seqs += params.n
            self._cond.notify()
        self._streams[request_id] = stream
        self._idle.clear()
        try:
            await stream._accepted()
        except BaseException:
            stream.close()  # cancelled while waiting: the engine may have taken it already
            raise
        return stream

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until the finished one. Submission errors are raised from the first
        iteration; stopping early (aclose, cancellation) aborts the request and frees its blocks at once."""
        stream = await self.submit(prompt_ids, params, request_id, pixel_values)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> bool:
        """Abort a request; its stream ends with a finished output whose unfinished samples say "abort".

        False if no such request is open. Its blocks are freed as soon as the engine thread gets the command.
        """
        stream = self._streams.get(request_id)
        if stream is None:
            return False
        stream._put(stream._abort_output())
        with self._cond:
            self._commands.append(_Abort(request_id))
            self._cond.notify()
        return True

    def _forget(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
        if not self._streams and self._idle is not None:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Wait until no request is in flight; after `timeout` seconds abort the rest. True if all finished.

        It does not refuse new requests: stop accepting them first, or drain may never see the engine idle.
        """
        if self._idle is None or self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            for request_id in list(self._streams):
                self.abort(request_id)
            return False

    def stats(self) -> EngineStats:
        """Read without stopping the engine thread: each number is current, but they may be a step apart.

        The reads (lengths, ints) are atomic in CPython, so the worst case is a slightly inconsistent
        snapshot, which is fine for metrics.
        """
        engine = self.engine
        return EngineStats(
            num_running=len(engine.scheduler.running),
            num_waiting=len(engine.scheduler.waiting),
            num_pending=self._pending_seqs,
            num_in_flight=len(self._streams),
            block_usage=engine.block_usage(),
            num_preemptions=engine.num_preemptions,
            prefix_cache_hits=sum(m.pool.hits for m in engine.managers.values()),
            num_prompt_tokens=engine.num_prompt_tokens,
            num_generated_tokens=engine.num_generated_tokens,
            is_alive=self.is_alive,
        )

    # -- engine thread ----------------------------------------------------------------------------------

    def _send(self, stream: RequestStream, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(stream._put, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _fail(self, streams: list[RequestStream], error: EngineDeadError) -> None:
        for stream in streams:
            # A fresh exception each: one instance raised in many tasks would share (and grow) one traceback.
            self._send(stream, EngineDeadError(str(error), error.cause))

    def _take_adds(self) -> list[_Add]:
        """Empty the command queue (lock held); returns the adds, whose streams still need an answer."""
        adds = [c for c in self._commands if isinstance(c, _Add)]
        self._commands.clear()
        self._pending_seqs = 0
        return adds

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            self._live.pop(command.request_id, None)
            return
        stream = command.stream
        try:
            self.engine.add_request(stream.request_id, command.prompt_ids, command.params, command.pixel_values)
        except Exception as exc:  # the request's own fault (ValueError family): only it fails
            self._send(stream, exc)
            return
        self._live[stream.request_id] = stream
        self._send(stream, _ACCEPTED)

    def _serve(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._commands and not self._stop_requested and not engine.has_unfinished():
                    self._cond.wait()
                if self._stop_requested:
                    return
                # Under the lock, so submit's waiting count stays exact; one at a time, so if one fails the
                # engine, the adds not yet applied are still queued for _run to fail.
                while self._commands:
                    command = self._commands.popleft()
                    if isinstance(command, _Add):
                        self._pending_seqs -= command.params.n
                    self._apply(command)
            if not engine.has_unfinished():
                continue
            for out in engine.step():
                stream = self._live.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._live[out.request_id]
                self._send(stream, out if out.error is None else request_failed(out))

    def _run(self) -> None:
        try:
            self._serve()
            error = EngineDeadError("the engine has been shut down")
        except Exception as exc:
            logger.exception("engine step failed; the engine is stopping")
            self.fatal_error = exc
            error = EngineDeadError(f"the engine died: {exc!r}", exc)
        with self._cond:
            self._closed = True
            pending = self._take_adds()
        if self.fatal_error is None:  # a clean stop: give every block back
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
        self._fail([*self._live.values(), *(c.stream for c in pending)], error)
        self._live.clear()
        if self.fatal_error is not None and self.on_death is not None:
            self._send_call(self.on_death)

    def _send_call(self, fn) -> None:
        """Run fn on the event loop, if it still runs."""
        try:
            self._loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the event loop is closed
            pass


def request_failed(out: RequestOutput) -> RequestFailedError:
    """What a failed request's stream raises; the message names the error's type, not its text (which may
    hold internals), and the log has the traceback."""
    return RequestFailedError(f"the engine could not compute this request ({type(out.error).__name__})", out.error)
