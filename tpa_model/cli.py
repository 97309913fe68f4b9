"""tpa-convert, and the argument helpers the other command-line tools share."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .cache.quantization import KVCacheDtype, parse_cache_dtype
from .checkpoints.loader import load_model, save_model
from .checkpoints.named_models import resolve_model
from .checkpoints.provenance import healing_fields, quality_fields, record
from .checkpoints.safetensors_files import CheckpointError
from .compression.convert import (
    DEFAULT_ENERGY,
    FITS,
    kl_divergence,
    make_heads_contextual,
    reduce_rank,
    to_per_token_svd,
)
from .compression.rank_allocation import cache_fraction, choose_layer_ranks
from .tokenizers.hf_tokenizer import load_tokenizer

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


def cache_dtype_arg(value: str) -> str:
    try:
        return parse_cache_dtype(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_cache_dtype_args(parser: argparse.ArgumentParser) -> None:
    """--kv-cache-dtype and --v-cache-dtype, as vLLM names the first: how the KV cache stores keys and values."""
    parser.add_argument("--kv-cache-dtype", type=cache_dtype_arg, default="auto",
                        help="how the KV cache stores keys (and values, unless --v-cache-dtype): auto (the model's "
                             "dtype), int8, fp8_e4m3 (alias fp8) or int4; default %(default)s")
    parser.add_argument("--v-cache-dtype", type=cache_dtype_arg, default=None,
                        help="how the KV cache stores values (default: as --kv-cache-dtype)")


def resolve_cache_dtype(args: argparse.Namespace) -> KVCacheDtype:
    return KVCacheDtype.parse(args.kv_cache_dtype, args.v_cache_dtype)


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


def harness(original, candidate, tokenizer, args):
    """The quality harness, CPU-sized: tpa-eval runs the full one."""
    from .evaluation.quality import evaluate

    return evaluate(original, candidate, tokenizer, eval_tokens=args.eval_tokens, chat_prompts=8,
                    passkey_lengths=(256, 512), passkey_trials=3)


def evaluate_into(model, original, tokenizer, args) -> None:
    """Run the quality harness against the original (exact) model and record its figures in the model."""
    report = harness(original, model, tokenizer, args)
    print(report.format())
    record(model, "quality", **quality_fields(report))


def token_count(value: str) -> int:
    """A token budget: 50000, 50k or 1.5M."""
    scale = {"k": 1_000, "m": 1_000_000}.get(value[-1:].lower(), 1)
    try:
        count = int(float(value[:-1] if scale > 1 else value) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count such as 50000, 50k or 1.5M, got {value!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"a token budget must be positive, got {value!r}")
    return count


def add_heal_args(parser: argparse.ArgumentParser) -> None:
    from .compression.heal import DEFAULT_LR, SOURCES, TRAIN_MODES

    g = parser.add_argument_group("healing: distil the converted model towards the original (KL on next tokens)")
    g.add_argument("--heal", type=token_count, default=None, metavar="TOKENS",
                   help="train on this many tokens (e.g. 200k) of calibration prose so the converted model's "
                        "next-token distributions match the original's")
    g.add_argument("--heal-train", choices=TRAIN_MODES, default="factors",
                   help="factors: the K and V factor projections (default); attention: also queries and output")
    g.add_argument("--heal-source", choices=SOURCES, default="calibration",
                   help="calibration: the calibration prose; teacher: text the original writes from its prompts")
    g.add_argument("--heal-seq-len", type=int, default=256)
    g.add_argument("--heal-batch-size", type=int, default=4)
    g.add_argument("--heal-lr", type=float, default=DEFAULT_LR, help="peak learning rate (default %(default)s)")
    g.add_argument("--heal-checkpoint", type=Path, default=None,
                   help="healing state, saved as it goes and resumed from (default: OUT/healing)")
    g.add_argument("--heal-max-steps", type=int, default=None,
                   help="stop this call after so many steps; the same command continues from the checkpoint")
    g.add_argument("--contextual-heads", action="store_true",
                   help="T6's contextual head factors: a token-dependent part, started at zero, that healing trains")


def heal_into(model, original, tokenizer, args) -> None:
    """Heal in place (float32), with the harness before and after when --evaluate; record both in the model."""
    from .compression.heal import heal

    eval_fn = (lambda candidate: harness(original, candidate, tokenizer, args)) if args.evaluate else None
    report = heal(model, original, tokenizer, token_budget=args.heal, seq_len=args.heal_seq_len,
                  batch_size=args.heal_batch_size, lr=args.heal_lr, train=args.heal_train, source=args.heal_source,
                  checkpoint_dir=args.heal_checkpoint or Path(args.out) / "healing", max_steps=args.heal_max_steps,
                  eval_fn=eval_fn, log_every=10)
    print(report.format())
    record(model, "healing", **healing_fields(report))
    if eval_fn is not None:
        before = report.before
        if before is not None and hasattr(before, "format"):
            print("before healing:\n" + before.format())
        after = report.evals[-1].result if report.evals else None
        if hasattr(after, "format"):
            print("after healing:\n" + after.format())
            record(model, "quality", **quality_fields(after))


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


def calibration_text(value: str) -> str:
    """--calibration: a text file, or "prose" for the calibration side of evaluation.texts (never evaluated on)."""
    if value == "prose":
        from .evaluation import texts

        return "\n\n".join(texts.documents("calibration").values())
    return Path(value).read_text(encoding="utf-8")


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
    parser.add_argument("--calibration", default=None,
                        help="text for an activation-aware basis and the KL report: a file, or 'prose' for the "
                             "calibration side of the built-in prose (disjoint from what tpa-eval measures on)")
    parser.add_argument("--calibration-tokens", type=int, default=512)
    parser.add_argument("--fit", choices=FITS, default="activations",
                        help="with --calibration: 'activations' fits the basis to the keys and values themselves; "
                             "'attention' to the keys as the queries see them and the values as the output "
                             "projection sees them")
    parser.add_argument("--cache-budget", type=float, default=None,
                        help="choose a rank per layer so the global layers store at most this fraction of a "
                             "standard cache's bytes per token (all layers of a model without sliding windows); "
                             "needs --calibration")
    parser.add_argument("--sliding-budget", type=float, default=1.0,
                        help="the same for sliding-window layers (default 1.0: exact)")
    parser.add_argument("--evaluate", action="store_true",
                        help="measure the converted model against the original on held-out prose (tpa-eval's "
                             "harness, CPU-sized) and record the figures in the checkpoint (before and after "
                             "healing with --heal)")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--factorization", choices=["basis", "svd"], default="basis",
                        help="basis: one head basis per layer (default); svd: each token's keys and values "
                             "factored by their own SVD when cached (weights stay exact)")
    add_heal_args(parser)
    args = parser.parse_args(argv)
    if args.heal is not None and args.factorization == "svd":
        parser.error("--heal trains head-basis factors; per-token SVD factors have nothing to train")
    try:
        t0 = time.perf_counter()
        model = convert(args)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"tpa-convert: error: {e}", file=sys.stderr)
        return 1
    cfg = model.config
    ranks = "ranks per layer as in the table" if cfg.ranks_differ else f"k_rank={cfg.k_rank}, v_rank={cfg.v_rank}"
    print(f"saved TPA checkpoint to {args.out} ({ranks}, q_rank={cfg.tpa.q_rank or 'dense'}) "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


def convert(args: argparse.Namespace):
    """Load, convert, optionally heal and evaluate, save; returns the converted model."""
    source = resolve_model(args.model)
    dtype = resolve_dtype(args)
    train_dtype = torch.float32 if args.heal is not None else dtype  # healing trains in float32
    model = load_model(source, dtype=train_dtype, device=args.device)
    tokenizer = load_tokenizer(source)
    calibration_ids = None
    if args.calibration is not None:
        ids = tokenizer.encode(calibration_text(args.calibration), add_bos=True)[: args.calibration_tokens]
        calibration_ids = torch.tensor([ids], dtype=torch.long)
    elif args.fit != "activations":
        raise ValueError("--fit attention measures the queries on text: give --calibration")
    k_rank, v_rank = args.k_rank, args.v_rank
    if args.cache_budget is not None:
        k_rank, v_rank = budget_ranks(model, calibration_ids, args)
        record(model, "budget", global_layers=args.cache_budget, sliding_layers=args.sliding_budget,
               calibration_tokens=int(calibration_ids.numel()))
    if args.factorization == "svd":
        svd_convert(model, k_rank, v_rank, calibration_ids)
    else:
        report = reduce_rank(model, k_rank, v_rank, args.q_rank, calibration_ids=calibration_ids,
                             energy=args.energy, fit=args.fit)
        print(report.format())
    if args.cache_budget is not None:
        print(f"cache per token: {cache_fraction(model.config):.3f} of a standard cache over all layers")
    if args.contextual_heads:
        make_heads_contextual(model)
    original = load_model(source, dtype=train_dtype, device=args.device) if args.evaluate or args.heal else None
    if args.heal is not None:
        heal_into(model, original, tokenizer, args)
    elif args.evaluate:
        evaluate_into(model, original, tokenizer, args)
    save_model(model.to(dtype), args.out, tokenizer=tokenizer, tokenizer_dir=source)
    return model
