"""tpa-eval: the quality of a converted (or healed) model against its original, on held-out text.

The candidate is a checkpoint (--candidate), or the original converted on load to --k-rank/--v-rank; the
figures are those of tpa_model.evaluation.quality.evaluate, printed as a table and optionally written as JSON and as a
quality-versus-cache-size PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from ..checkpoints.loader import load_model
from ..checkpoints.named_models import resolve_model
from ..checkpoints.safetensors_files import CheckpointError
from ..cli import DTYPES, add_cache_dtype_args, add_model_args, resolve_cache_dtype, resolve_dtype
from ..tokenizers.hf_tokenizer import load_tokenizer
from .quality import DEFAULT_DEPTHS, METRIC_LABELS, evaluate, frontier_points, plot_frontier, project_layer
from .texts import TextsUnavailable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpa-eval",
        description="Measure a converted model against its original: perplexity, KL, agreement, passkey "
                    "retrieval, on held-out text (the Python 3.11 documentation, fetched from Debian on first use).",
    )
    parser.add_argument("--model", required=True, help="the original: a directory, .gguf file or known name")
    parser.add_argument("--candidate", default=None,
                        help="a converted checkpoint (default: --model converted on load to --k-rank/--v-rank)")
    add_model_args(parser)
    add_cache_dtype_args(parser)
    parser.add_argument("--eval-tokens", type=int, default=4096,
                        help="predicted tokens for perplexity and KL (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per evaluation sequence (default %(default)s)")
    parser.add_argument("--passkey-lengths", type=int, nargs="*", default=[512, 1024],
                        help="prompt lengths (default %(default)s)")
    parser.add_argument("--passkey-depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS),
                        help="where the key sits in the haystack, 0 = start, 1 = end (default %(default)s)")
    parser.add_argument("--passkey-trials", type=int, default=5,
                        help="keys per passkey length and depth (default %(default)s)")
    parser.add_argument("--chat-prompts", type=int, default=16,
                        help="chat prompts continued greedily (at most 32; default %(default)s)")
    parser.add_argument("--greedy-tokens", type=int, default=32,
                        help="greedy tokens per chat prompt (default %(default)s)")
    parser.add_argument("--per-layer", action="store_true",
                        help="also measure each layer's sensitivity at the candidate's ranks")
    parser.add_argument("--session-len", type=int, default=None,
                        help="session length for the cache bytes (default: the context, at most 32768)")
    parser.add_argument("--cache-dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="dtype of the cache bytes counted for an auto cache and for the standard cache the "
                             "fraction is of (default %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="write the report as JSON")
    parser.add_argument("--png", type=Path, default=None, help="draw the report on a quality/cache-size frontier")
    parser.add_argument("--png-metric", choices=sorted(METRIC_LABELS), default="perplexity",
                        help="the quality axis of --png (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="passkey keys and haystacks")
    return parser


def load_pair(args: argparse.Namespace):
    """(original, candidate, tokenizer, candidate's name): the candidate converted on load when it is the
    original at lower ranks."""
    dtype = resolve_dtype(args)
    source = resolve_model(args.model)
    original = load_model(source, dtype=dtype, device=args.device)
    if args.candidate is None:
        candidate = load_model(source, k_rank=args.k_rank, v_rank=args.v_rank, dtype=dtype, device=args.device)
        name = f"{args.model} converted on load"
    else:
        candidate = load_model(resolve_model(args.candidate), k_rank=args.k_rank, v_rank=args.v_rank, dtype=dtype,
                               device=args.device)
        name = args.candidate
    candidate.kv_cache_dtype = resolve_cache_dtype(args)
    if candidate.kv_cache_dtype.quantized:
        name += f", cache {candidate.kv_cache_dtype.name()}"
    return original, candidate, load_tokenizer(source), name


def run(args: argparse.Namespace):
    original, candidate, tokenizer, name = load_pair(args)
    ranks = candidate.config.k_rank, candidate.config.v_rank
    report = evaluate(
        original, candidate, tokenizer, eval_tokens=args.eval_tokens, seq_len=args.seq_len,
        chat_prompts=args.chat_prompts, greedy_tokens=args.greedy_tokens, passkey_lengths=args.passkey_lengths,
        passkey_depths=args.passkey_depths, passkey_trials=args.passkey_trials,
        reduce_layer=project_layer(*ranks) if args.per_layer else None, session_len=args.session_len,
        cache_dtype=DTYPES[args.cache_dtype], seed=args.seed, verbose=True,
    )
    return dataclasses.replace(report, original=args.model, candidate=name)


def write_outputs(report, args: argparse.Namespace) -> None:
    if args.json is not None:
        report.to_json(args.json)
        print(f"wrote {args.json}")
    if args.png is not None:
        label = f"{report.candidate} ({report.kv_heads} kv heads)"
        plot_frontier({label: frontier_points([report], args.png_metric)}, args.png, metric=args.png_metric,
                      title=f"{args.model}: quality against cache size")
        print(f"wrote {args.png}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        report = run(args)
        print(report.format())
        write_outputs(report, args)
    except (CheckpointError, TextsUnavailable, OSError, ValueError, ImportError) as e:
        print(f"tpa-eval: error: {e}", file=sys.stderr)
        return 1
    print(f"evaluated in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
