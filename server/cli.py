"""tpa-generate: one-shot generation from the command line, through the serving engine."""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch

from tpa_model.cache.backends import BACKENDS, make_backend
from tpa_model.checkpoints.loader import load_model
from tpa_model.checkpoints.named_models import DEFAULT_MODEL, KNOWN_MODELS, resolve_model
from tpa_model.checkpoints.safetensors_files import CheckpointError
from tpa_model.cli import add_cache_dtype_args, add_model_args, resolve_dtype
from tpa_model.model.image_processing import ImageError, load_image
from tpa_model.sampling import SamplingParams
from tpa_model.tokenizers.gemma_tokenizer import ChatTemplateError
from tpa_model.tokenizers.hf_tokenizer import load_tokenizer
from tpa_model.tokenizers.prompts import PromptInputs, build_chat_inputs

from .engine.engine import EngineConfig, LLMEngine


def run_engine(engine: LLMEngine, prompt_ids: list[int], pixel_values, args) -> tuple[str, list[int]]:
    """One request through the serving engine."""
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_tokens=args.max_tokens)
    engine.add_request("cli", prompt_ids, params, pixel_values=pixel_values)
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            final = out
    if final.error is not None:
        raise ValueError(f"generation failed: {final.error!r}")
    return final.outputs[0].text, final.outputs[0].token_ids


MODEL_HELP = (f"a Hugging Face directory (Gemma 3 or Llama), a .gguf file, a TPA checkpoint, or one of "
              f"{', '.join(KNOWN_MODELS)} (default: {DEFAULT_MODEL})")


def one_request_engine(model, tokenizer, max_tokens: int, prompt_len_hint: int, kv_cache_dtype: str = "auto",
                       v_cache_dtype: str | None = None) -> LLMEngine:
    """An engine whose cache holds exactly one request of up to the model length (at most what it needs)."""
    block_size = 16
    longest = min(model.config.max_position_embeddings, prompt_len_hint + max_tokens)
    config = EngineConfig(block_size=block_size, max_num_seqs=1, max_model_len=longest,
                          num_blocks=-(-longest // block_size) + 1, kv_cache_dtype=kv_cache_dtype,
                          v_cache_dtype=v_cache_dtype)
    return LLMEngine(model, tokenizer, config)


def generate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tpa-generate", description="One-shot generation from the command line.")
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--system", default=None, help="optional system prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--image", action="append", default=[], type=Path,
                        help="image file to show the model before the prompt (repeatable)")
    parser.add_argument("--pan-and-scan", action="store_true", help="add pan-and-scan crops of wide images")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    add_model_args(parser)
    add_cache_dtype_args(parser)
    args = parser.parse_args(argv)
    try:
        path = resolve_model(args.model)
        model = load_model(path, k_rank=args.k_rank, v_rank=args.v_rank, dtype=resolve_dtype(args),
                           device=args.device)
        tokenizer = load_tokenizer(path)
        if args.raw:
            inputs = PromptInputs(tokenizer.encode(args.prompt, add_bos=True))
        else:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            parts = [{"type": "image"} for _ in args.image] + [{"type": "text", "text": args.prompt}]
            messages.append({"role": "user", "content": parts})
            if args.image and model.vision_config is None:
                raise ValueError("this model has no vision tower; --image needs a multimodal Gemma 3 (4b or larger)")
            images = [load_image(f) for f in args.image]
            inputs = build_chat_inputs(tokenizer, model.vision_config, messages, images, args.pan_and_scan)
        prompt_ids = inputs.token_ids
        engine = one_request_engine(model, tokenizer, args.max_tokens, len(prompt_ids), args.kv_cache_dtype,
                                    args.v_cache_dtype)
        t0 = time.perf_counter()
        text, out = run_engine(engine, prompt_ids, inputs.pixel_values, args)
        elapsed = time.perf_counter() - t0
    except (CheckpointError, ChatTemplateError, ImageError, OSError, ValueError) as e:
        print(f"tpa-generate: error: {e}", file=sys.stderr)
        return 1
    print(text)
    print(f"[{len(prompt_ids)} prompt tokens, {len(out)} generated in {elapsed:.2f}s, model {path}]",
          file=sys.stderr)
    return 0


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpa-serve", description="OpenAI-compatible server for Gemma 3 with TPA.")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    add_model_args(p)
    add_cache_dtype_args(p)
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences decoded together")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: model's)")
    p.add_argument("--cache-memory", type=float, default=None,
                   help="KV cache size in GiB (default on CUDA: what --gpu-memory-utilization leaves after the "
                        "weights and a warm-up step's activations; 1 GiB on CPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of the GPU's total memory for weights, activations and KV cache (default 0.9)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--attention-backend", default="auto", choices=BACKENDS,
                   help="decode attention: triton kernels (CUDA) or the PyTorch reference (default: auto, triton "
                        "on CUDA when it imports)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run every step eagerly: capture no CUDA graphs for decode steps (by default they are "
                        "captured on CUDA with the triton backend, one per batch size up to --max-num-seqs)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--max-waiting", type=int, default=1024, help="queued sequences before answering 503")
    p.add_argument("--api-key", default=os.environ.get("TPA_API_KEY"),
                   help="require this bearer token on /v1/ routes (default: $TPA_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: directory name)")
    p.add_argument("--disable-remote-images", action="store_true", help="accept only data: URLs for images")
    add_image_args(p)
    add_http_args(p)
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM")
    p.add_argument("--stream-timeout", type=float, default=60.0,
                   help="seconds a streaming client may read nothing before it is disconnected")
    p.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    return p


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")

# What each number of tpa-serve must satisfy, checked before the model loads: a zero or negative value would
# otherwise start a server that hangs (no seats, no token budget), refuses everything, or crashes later.
# Comparisons are written so that NaN fails them.
SERVE_LIMITS = [
    ("port", lambda v: 1 <= v <= 65535, "a port number from 1 to 65535"),
    ("max_num_seqs", lambda v: v >= 1, "at least 1"),
    ("max_num_batched_tokens", lambda v: v >= 1, "at least 1"),
    ("max_model_len", lambda v: v >= 2, "at least 2 (one prompt token and one generated token)"),
    ("cache_memory", lambda v: 0 < v < math.inf, "a positive number of GiB"),
    ("gpu_memory_utilization", lambda v: 0 < v <= 1, "above 0 and at most 1"),
    ("block_size", lambda v: 1 <= v <= 1024, "from 1 to 1024 tokens"),
    ("max_waiting", lambda v: v >= 1, "at least 1"),
    ("graceful_timeout", lambda v: 0 <= v < math.inf, "a finite number of seconds, 0 or more"),
    ("stream_timeout", lambda v: 0 < v < math.inf, "a positive, finite number of seconds"),
]


def check_serve_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag's value, with argparse's one-line error and exit status 2 for the first bad one."""
    for name, ok, what in SERVE_LIMITS:
        value = getattr(args, name)
        if value is not None and not ok(value):
            parser.error(f"--{name.replace('_', '-')} must be {what}, got {value}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        parser.error("--served-model-name must not be empty")
    if args.max_concurrent_image_fetches < args.max_images_per_request:  # else the largest request never fits
        parser.error(f"--max-concurrent-image-fetches ({args.max_concurrent_image_fetches}) must be at least "
                     f"--max-images-per-request ({args.max_images_per_request})")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device")
    try:
        make_backend(args.attention_backend, device)
    except ValueError as e:
        parser.error(f"--attention-backend {args.attention_backend}: {e}")


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a port in use is reported in a second rather
    than after minutes of loading; uvicorn serves on this very socket."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def add_image_args(p: argparse.ArgumentParser) -> None:
    """What a request's images may cost, and where image URLs may point (server/openai/images.py)."""
    p.add_argument("--allow-private-image-urls", action="store_true",
                   help="fetch image URLs that resolve to loopback, private, link-local or metadata addresses")
    p.add_argument("--max-images-per-request", type=positive(int), default=8)
    p.add_argument("--max-image-pixels", type=positive(int), default=50_000_000,
                   help="decoded pixels of all of a request's images together")
    p.add_argument("--max-image-bytes", type=positive(int), default=20 << 20, help="bytes of one image")
    p.add_argument("--image-fetch-timeout", type=positive(float), default=10.0,
                   help="seconds for the whole fetch of one image URL, redirects included")
    p.add_argument("--max-concurrent-image-fetches", type=positive(int), default=32,
                   help="image URLs fetched at once, server-wide; more get 503")


def add_http_args(p: argparse.ArgumentParser) -> None:
    """What one HTTP request may cost before the engine sees it, how long a client may be slow, and the docs."""
    p.add_argument("--max-request-bytes", type=positive(int), default=32 << 20,
                   help="largest request body, images in data URLs included (default 32 MiB); larger: 413")
    p.add_argument("--max-text-chars", type=positive(int), default=1_000_000,
                   help="characters of a request's text (a chat's messages, or each prompt) before tokenizing")
    p.add_argument("--timeout-keep-alive", type=positive(float), default=5.0,
                   help="seconds an idle keep-alive connection stays open")
    p.add_argument("--header-timeout", type=positive(float), default=10.0,
                   help="seconds a client has to send a request's headers")
    p.add_argument("--body-timeout", type=positive(float), default=30.0,
                   help="seconds a client has to send a request's whole body; slower: 408")
    p.add_argument("--disable-docs", action="store_true", help="serve no /docs, /redoc or /openapi.json")


def uvicorn_config(app, args: argparse.Namespace):
    """uvicorn's settings from tpa-serve's flags: slow clients cut by timeouts (see server/timeouts.py), and
    logging left to ours (log_config=None), whose lines carry the request id."""
    import uvicorn

    from .timeouts import TimedH11Protocol

    protocol = functools.partial(TimedH11Protocol, header_timeout=args.header_timeout)
    return uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None,
                          http=protocol, timeout_keep_alive=args.timeout_keep_alive,
                          timeout_graceful_shutdown=args.graceful_timeout)


def positive(kind):
    """An argparse type: a number of `kind` above zero, else argparse's one-line error and exit status 2."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > 0 and math.isfinite(value)):  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_server(args: argparse.Namespace):
    """(FastAPI app, AsyncEngine) from parsed tpa-serve arguments."""
    from .engine.async_engine import AsyncEngine
    from .openai.api_server import create_app
    from .openai.settings import ServerSettings

    path = resolve_model(args.model)
    model = load_model(path, k_rank=args.k_rank, v_rank=args.v_rank, dtype=resolve_dtype(args), device=args.device)
    tokenizer = load_tokenizer(path)
    config = EngineConfig(
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        cache_memory_gib=args.cache_memory, prefix_caching=not args.no_prefix_caching,
        attention_backend=args.attention_backend, gpu_memory_utilization=args.gpu_memory_utilization,
        cuda_graphs=False if args.enforce_eager else None, kv_cache_dtype=args.kv_cache_dtype,
        v_cache_dtype=args.v_cache_dtype,
    )
    engine = LLMEngine(model, tokenizer, config)
    async_engine = AsyncEngine(engine, max_waiting=args.max_waiting)
    name = args.served_model_name or served_name(args.model)
    settings = ServerSettings(model_name=name, max_model_len=engine.max_model_len, api_key=args.api_key,
                              stream_timeout=args.stream_timeout,
                              allow_remote_images=not args.disable_remote_images,
                              allow_private_image_urls=args.allow_private_image_urls,
                              max_images_per_request=args.max_images_per_request,
                              max_image_pixels=args.max_image_pixels, max_image_bytes=args.max_image_bytes,
                              image_fetch_timeout=args.image_fetch_timeout,
                              max_concurrent_image_fetches=args.max_concurrent_image_fetches,
                              drain_timeout=args.graceful_timeout, max_request_bytes=args.max_request_bytes,
                              max_text_chars=args.max_text_chars, body_timeout=args.body_timeout,
                              docs=not args.disable_docs)
    return create_app(async_engine, tokenizer, settings), async_engine


def served_name(model: str | None) -> str:
    """The model id clients send: a known model's name, else the checkpoint's directory or file name."""
    model = model or DEFAULT_MODEL
    if model in KNOWN_MODELS:
        return model
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


def serve_main(argv: list[str] | None = None) -> int:
    """Exit status 0 after a clean stop; 1 if the model cannot load or the engine dies (so a supervisor
    restarts the server); 2 for a bad flag or a port that cannot be bound, before the model loads."""
    import logging

    from .middleware import install_log_record_factory

    parser = serve_parser()
    args = parser.parse_args(argv)
    check_serve_args(parser, args)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        parser.error(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    install_log_record_factory()  # before any handler formats %(request_id)s
    logging.basicConfig(level=args.log_level.upper().replace("TRACE", "DEBUG"),
                        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
    try:
        app, engine = build_server(args)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"tpa-serve: error: {e}", file=sys.stderr)
        return 1
    server = GracefulServer(uvicorn_config(app, args))
    engine.on_death = server.engine_died
    server.run(sock)
    if engine.fatal_error is not None:
        print(f"tpa-serve: error: the engine died: {engine.fatal_error!r}", file=sys.stderr)
        return 1
    return 0


class GracefulServer:
    """uvicorn, but SIGTERM/SIGINT end in exit status 0: stop accepting, let open requests finish within the
    graceful timeout, then the app's lifespan drains and stops the engine. (uvicorn itself re-raises the
    signal after shutting down, which makes the process die by it.) A second signal exits at once, with
    status 128 + its number, as a process killed by it would: an operator who signals twice means it."""

    def __init__(self, config):
        import uvicorn

        self.server = uvicorn.Server(config)
        self.server.capture_signals = contextlib.nullcontext  # our handlers below, not uvicorn's re-raise

    def engine_died(self) -> None:
        """The engine thread is gone and its requests have failed: stop serving, so the process exits."""
        self.server.should_exit = True

    def stop(self, signum: int, _frame=None) -> None:
        if self.server.should_exit:
            print(f"tpa-serve: second {signal.Signals(signum).name}: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.server.should_exit = True

    def run(self, sock: socket.socket | None = None) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        self.server.run(sockets=[sock] if sock is not None else None)
