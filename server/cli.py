"""tpa-generate: one-shot generation from the command line, through the serving engine."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tpa_model.checkpoint import CheckpointError
from tpa_model.cli import add_model_args, resolve_dtype
from tpa_model.config import GLOBAL, SLIDING
from tpa_model.image_processing import ImageError, ImageProcessorConfig, load_image, preprocess
from tpa_model.loader import load_model
from tpa_model.prompts import encode_chat_with_images
from tpa_model.tokenizer import ChatTemplateError, GemmaTokenizer

from .engine.engine import EngineConfig, LLMEngine
from .engine.sampling import SamplingParams


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


def run_engine(model, tokenizer: GemmaTokenizer, prompt_ids: list[int], pixel_values, args) -> tuple[str, list[int]]:
    """One request through the serving engine, with a paged cache sized for exactly this request."""
    block_size = 16
    blocks = -(-(len(prompt_ids) + args.max_tokens) // block_size) + 1
    config = EngineConfig(block_size=block_size, max_num_seqs=1, num_blocks={GLOBAL: blocks, SLIDING: blocks})
    engine = LLMEngine(model, tokenizer, config)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_tokens=args.max_tokens)
    engine.add_request("cli", prompt_ids, params, pixel_values=pixel_values)
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            final = out
    return final.outputs[0].text, final.outputs[0].token_ids


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
            from tpa_model.demo import demo_model_dir

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
        text, out = run_engine(model, tokenizer, prompt_ids, pixel_values, args)
        elapsed = time.perf_counter() - t0
    except (CheckpointError, ChatTemplateError, ImageError, OSError, ValueError) as e:
        print(f"tpa-generate: error: {e}", file=sys.stderr)
        return 1
    print(text)
    print(f"[{len(prompt_ids)} prompt tokens, {len(out)} generated in {elapsed:.2f}s, model {path}]",
          file=sys.stderr)
    return 0
