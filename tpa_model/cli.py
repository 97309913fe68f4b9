"""Command-line tools: tpa-convert and tpa-generate."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .convert import DEFAULT_ENERGY, reduce_rank
from .generation import Sampling, generate
from .image_processing import ImageError, ImageProcessorConfig, load_image, preprocess
from .loader import load_model, save_model
from .prompts import encode_chat_with_images
from .tokenizer import ChatTemplateError, GemmaTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rank_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        rank = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None
    if rank < 1:
        raise argparse.ArgumentTypeError(f"ranks must be at least 1, got {rank}")
    return rank


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--k-rank", type=rank_arg, default=None, help="key rank (default: exact)")
    parser.add_argument("--v-rank", type=rank_arg, default=None, help="value rank (default: exact)")


def resolve_dtype(args: argparse.Namespace) -> torch.dtype:
    if args.dtype:
        return DTYPES[args.dtype]
    return torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32


def convert_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tpa-convert",
        description="Convert a Hugging Face Gemma 3 checkpoint to a TPA checkpoint and print the error report.",
    )
    parser.add_argument("--model", required=True, help="Hugging Face Gemma 3 directory (or a TPA checkpoint)")
    parser.add_argument("--out", required=True, help="output directory")
    add_model_args(parser)
    parser.add_argument("--q-rank", type=rank_arg, default=None, help="query rank (default: dense queries)")
    parser.add_argument("--energy", type=float, default=DEFAULT_ENERGY,
                        help="eigenvalue energy kept by --k-rank/--v-rank auto (default %(default)s)")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="text file for an activation-aware basis and the KL report")
    parser.add_argument("--calibration-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    try:
        t0 = time.perf_counter()
        model = load_model(args.model, dtype=resolve_dtype(args), device=args.device)
        calibration_ids = None
        if args.calibration is not None:
            tokenizer = GemmaTokenizer.from_dir(Path(args.model))
            text = args.calibration.read_text(encoding="utf-8")
            ids = tokenizer.encode(text, add_bos=True)[: args.calibration_tokens]
            calibration_ids = torch.tensor([ids], dtype=torch.long)
        report = reduce_rank(
            model, args.k_rank, args.v_rank, args.q_rank, calibration_ids=calibration_ids, energy=args.energy
        )
        print(report.format())
        save_model(model, args.out, tokenizer_dir=args.model)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"tpa-convert: error: {e}", file=sys.stderr)
        return 1
    cfg = model.config
    print(f"saved TPA checkpoint to {args.out} (k_rank={cfg.k_rank}, v_rank={cfg.v_rank}, "
          f"q_rank={cfg.tpa.q_rank or 'dense'}) in {time.perf_counter() - t0:.1f}s")
    return 0


def image_prompt(model, tokenizer: GemmaTokenizer, messages: list[dict], files: list[Path], pan_and_scan: bool):
    """(pixel values, prompt ids) for a chat whose image parts are the given files, in order."""
    vision = model.vision_config
    if vision is None:
        raise ValueError("this model has no vision tower; --image needs a multimodal Gemma 3 (4b or larger)")
    images = [load_image(f) for f in files]
    config = ImageProcessorConfig(image_size=vision.image_size, do_pan_and_scan=pan_and_scan)
    pixel_values, crops = preprocess(images, config)
    ids = encode_chat_with_images(tokenizer, messages, vision.mm_tokens_per_image, crops)
    return pixel_values, ids


def generate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tpa-generate", description="One-shot generation from the command line.")
    parser.add_argument("--model", default=None, help="model directory (default: the built-in demo model)")
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
    args = parser.parse_args(argv)
    try:
        if args.model is None:
            from .demo import demo_model_dir

            path = demo_model_dir()
        else:
            path = Path(args.model)
        model = load_model(path, k_rank=args.k_rank, v_rank=args.v_rank, dtype=resolve_dtype(args),
                           device=args.device)
        tokenizer = GemmaTokenizer.from_dir(path)
        pixel_values = None
        if args.raw:
            prompt_ids = tokenizer.encode(args.prompt, add_bos=True)
        else:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            parts = [{"type": "image"} for _ in args.image] + [{"type": "text", "text": args.prompt}]
            messages.append({"role": "user", "content": parts})
            if args.image:
                pixel_values, prompt_ids = image_prompt(model, tokenizer, messages, args.image, args.pan_and_scan)
            else:
                prompt_ids = tokenizer.encode_chat(messages)
        t0 = time.perf_counter()
        sampling = Sampling(args.temperature, args.top_p, args.top_k, args.seed)
        out = generate(model, [prompt_ids], args.max_tokens, sampling, tokenizer.stop_token_ids,
                       vocab_limit=tokenizer.vocab_size, pixel_values=pixel_values)[0]
        elapsed = time.perf_counter() - t0
    except (CheckpointError, ChatTemplateError, ImageError, OSError, ValueError) as e:
        print(f"tpa-generate: error: {e}", file=sys.stderr)
        return 1
    print(tokenizer.decode(out))
    print(f"[{len(prompt_ids)} prompt tokens, {len(out)} generated in {elapsed:.2f}s, model {path}]",
          file=sys.stderr)
    return 0
