"""Quality on held-out prose against healing tokens: how far a given budget of healing brings a converted
model back towards its original, so the budget that reaches a target can be read off the curve.

    OMP_NUM_THREADS=2 python bench/heal_curve.py --model smollm2 --ranks-from CHECKPOINT --tokens 100k \\
        --eval-at 5k 10k 20k 40k 70k --out /tmp/healed

The student is the original converted at the ranks of --ranks-from (a TPA checkpoint, e.g. one tpa-convert
--cache-budget wrote) or --k-rank/--v-rank, with the attention-aware basis fitted on calibration prose; the
teacher is the original. At every point of --eval-at (and before and after) the student's perplexity, KL and
top-1 agreement are measured on the first --eval-tokens tokens of the evaluation prose, which healing never
reads. Healing checkpoints go to OUT/healing, so an interrupted run continues where it stopped; the healed
model is saved to OUT, the curve to bench/results/heal_curve_<model>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import calibration_ids, checkpoint_config

from tpa_model.checkpoints.loader import load_model, save_model
from tpa_model.checkpoints.named_models import resolve_model
from tpa_model.checkpoints.provenance import healing_fields, record
from tpa_model.cli import token_count
from tpa_model.compression.convert import make_heads_contextual, reduce_rank
from tpa_model.compression.heal import heal
from tpa_model.compression.rank_allocation import cache_fraction
from tpa_model.evaluation import texts
from tpa_model.evaluation.quality import eval_sequences, next_token_metrics, vocab_limit
from tpa_model.tokenizers.hf_tokenizer import load_tokenizer


def student_ranks(args) -> tuple[list[int] | int, list[int] | int]:
    if args.ranks_from is None:
        return args.k_rank, args.v_rank
    config = checkpoint_config(args.ranks_from)
    ranks = [config.layer_ranks(i) for i in range(config.num_hidden_layers)]
    return [k for k, _ in ranks], [v for _, v in ranks]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ranks-from", type=Path, default=None)
    parser.add_argument("--k-rank", type=int, default=2)
    parser.add_argument("--v-rank", type=int, default=1)
    parser.add_argument("--tokens", type=token_count, default=100_000)
    parser.add_argument("--eval-at", type=token_count, nargs="*", default=[])
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--train", default="attention")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--no-contextual-heads", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    teacher, student = load_model(source), load_model(source)
    cal = calibration_ids(tokenizer, args.calibration_tokens)
    reduce_rank(student, *student_ranks(args), calibration_ids=cal, fit="attention", progress=False)
    if not args.no_contextual_heads:
        make_heads_contextual(student)
    held_out = eval_sequences(tokenizer, texts.documents("eval").values(), args.eval_tokens, 512)
    vocab = vocab_limit(teacher, tokenizer)

    def measure(model):
        figures = next_token_metrics(teacher, model, held_out, vocab)
        print(f"  held out: perplexity {figures['perplexity_candidate']:.2f} (original "
              f"{figures['perplexity_original']:.2f}), KL {figures['kl']:.4f}, top-1 {figures['top1_agreement']:.1%}",
              flush=True)
        return figures

    report = heal(student, teacher, tokenizer, token_budget=args.tokens, seq_len=args.seq_len,
                  batch_size=args.batch_size, lr=args.lr, train=args.train, checkpoint_dir=args.out / "healing",
                  checkpoint_every=5, eval_fn=measure, eval_at=args.eval_at, log_every=5)
    print(report.format())
    record(student, "healing", **healing_fields(report))
    save_model(student, args.out, tokenizer=tokenizer, tokenizer_dir=source)
    result = {"model": args.model, "cache_fraction": cache_fraction(student.config),
              "ranks": student.config.tpa.layer_ranks or [student.config.k_rank, student.config.v_rank],
              "train": args.train, "lr": args.lr, "eval_tokens": args.eval_tokens,
              "points": [{"tokens": e.tokens, **e.result} for e in report.evals],
              "training_curve": report.curve, "seconds_per_1k_tokens": report.seconds_per_1k_tokens}
    path = args.json or Path("bench/results") / f"heal_curve_{args.model}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'tokens':>8} {'perplexity':>10} {'KL':>8} {'top-1':>7}")
    for p in result["points"]:
        print(f"{p['tokens']:>8} {p['perplexity_candidate']:>10.2f} {p['kl']:>8.4f} {p['top1_agreement']:>7.1%}")
    print(f"curve written to {path}; healed model saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
