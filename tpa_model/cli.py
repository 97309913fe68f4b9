"""tpa-convert, and the argument helpers the other command-line tools share."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .convert import DEFAULT_ENERGY, kl_divergence, reduce_rank, to_per_token_svd
from .hf_tokenizer import load_tokenizer
from .loader import load_model, save_model
from .models import resolve_model
from .provenance import quality_fields, record
from .rank_allocation import cache_fraction, choose_layer_ranks

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


def budget_ranks(model, calibration_ids, args) -> tuple[list[int], list[int]]:
    """Per-layer (k, v) ranks from measured sensitivity, within --cache-budget and --sliding-budget."""
    if calibration_ids is None:
        raise ValueError("--cache-budget measures each layer's sensitivity on text: give --calibration")
    if args.k_rank is not None or args.v_rank is not None:
        raise ValueError("--cache-budget chooses the ranks: leave out --k-rank and --v-rank")
    for name in ("cache_budget", "sliding_budget"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(args, name)}")
    ranks = choose_layer_ranks(model, calibration_ids, args.cache_budget, args.sliding_budget)
    return [k for k, _ in ranks], [v for _, v in ranks]


def evaluate_into(model, source: Path, args) -> None:
    """Run the quality harness against the original (exact) model and record its figures in the model."""
    from .quality import evaluate

    original = load_model(source, dtype=model.dtype, device=args.device)
    report = evaluate(original, model, load_tokenizer(source), eval_tokens=args.eval_tokens, chat_prompts=8,
                      passkey_lengths=(256, 512), passkey_trials=3)
    print(report.format())
    record(model, "quality", **quality_fields(report))


@torch.no_grad()
def svd_convert(model, k_rank, v_rank, calibration_ids) -> None:
    """Per-token SVD factors at the given ranks, and their KL on the calibration text when there is some."""
    G = model.config.num_key_value_heads
    if k_rank == "auto" or v_rank == "auto":
        raise ValueError("--factorization svd takes explicit ranks (or --cache-budget), not auto")
    reference = model(calibration_ids) if calibration_ids is not None else None
    to_per_token_svd(model, G if k_rank is None else k_rank, G if v_rank is None else v_rank)
    if reference is not None:
        print(f"next-token KL(original || converted): {kl_divergence(reference, model(calibration_ids)):.6f} "
              "nats/token (per-token SVD factors)")


def convert_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tpa-convert",
        description="Convert a checkpoint (Hugging Face directory, .gguf file or a known model name) to a TPA "
                    "checkpoint and print the error report.",
    )
    parser.add_argument("--model", required=True, help="Hugging Face directory, .gguf file, TPA checkpoint, or a "
                                                       "known model name (gemma-3-270m, smollm2)")
    parser.add_argument("--out", required=True, help="output directory")
    add_model_args(parser)
    parser.add_argument("--q-rank", type=rank_arg, default=None, help="query rank (default: dense queries)")
    parser.add_argument("--energy", type=float, default=DEFAULT_ENERGY,
                        help="eigenvalue energy kept by --k-rank/--v-rank auto (default %(default)s)")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="text file for an activation-aware basis and the KL report")
    parser.add_argument("--calibration-tokens", type=int, default=512)
    parser.add_argument("--cache-budget", type=float, default=None,
                        help="choose a rank per layer so the global layers store at most this fraction of a "
                             "standard cache's bytes per token (all layers of a model without sliding windows); "
                             "needs --calibration")
    parser.add_argument("--sliding-budget", type=float, default=1.0,
                        help="the same for sliding-window layers (default 1.0: exact)")
    parser.add_argument("--evaluate", action="store_true",
                        help="measure the converted model against the original on held-out prose (tpa-eval's "
                             "harness, CPU-sized) and record the figures in the checkpoint")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--factorization", choices=["basis", "svd"], default="basis",
                        help="basis: one head basis per layer (default); svd: each token's keys and values "
                             "factored by their own SVD when cached (weights stay exact)")
    args = parser.parse_args(argv)
    try:
        t0 = time.perf_counter()
        source = resolve_model(args.model)
        model = load_model(source, dtype=resolve_dtype(args), device=args.device)
        calibration_ids = None
        if args.calibration is not None:
            tokenizer = load_tokenizer(source)
            text = args.calibration.read_text(encoding="utf-8")
            ids = tokenizer.encode(text, add_bos=True)[: args.calibration_tokens]
            calibration_ids = torch.tensor([ids], dtype=torch.long)
        k_rank, v_rank = args.k_rank, args.v_rank
        if args.cache_budget is not None:
            k_rank, v_rank = budget_ranks(model, calibration_ids, args)
        if args.cache_budget is not None:
            record(model, "budget", global_layers=args.cache_budget, sliding_layers=args.sliding_budget,
                   calibration_tokens=int(calibration_ids.numel()))
        if args.factorization == "svd":
            svd_convert(model, k_rank, v_rank, calibration_ids)
        else:
            report = reduce_rank(model, k_rank, v_rank, args.q_rank, calibration_ids=calibration_ids,
                                 energy=args.energy)
            print(report.format())
        if args.cache_budget is not None:
            print(f"cache per token: {cache_fraction(model.config):.3f} of a standard cache over all layers")
        if args.evaluate:
            evaluate_into(model, source, args)
        save_model(model, args.out, tokenizer=load_tokenizer(source), tokenizer_dir=source)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"tpa-convert: error: {e}", file=sys.stderr)
        return 1
    cfg = model.config
    ranks = "ranks per layer as in the table" if cfg.ranks_differ else f"k_rank={cfg.k_rank}, v_rank={cfg.v_rank}"
    print(f"saved TPA checkpoint to {args.out} ({ranks}, q_rank={cfg.tpa.q_rank or 'dense'}) "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0
