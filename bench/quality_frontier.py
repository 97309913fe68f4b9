"""Quality against cache size for a real model: every conversion method at 100%, 70%, 52% and 35% of a
standard cache, and healed checkpoints, measured by the quality harness on held-out prose.

    OMP_NUM_THREADS=2 python bench/quality_frontier.py --model smollm2 [--healed DIR ...]

For a model with G kv heads and head_dim d, one part (K or V) of a layer stores G*d numbers per token plain
and R*(G + d) as rank-R factors. On SmolLM2 (G=3, d=64): ranks (2,2) store 70%, (2,1) 52%, (1,1) 35%. The
per-layer rows choose a rank per layer under the same budgets from measured sensitivity (calibration text).

Each variant's report is written to bench/results/quality/<model>/<variant>.json as it finishes, and a
variant whose file exists is read back instead of measured again, so the run can be split across sessions.
Per-layer rows measure the ranks per layer that `tpa-convert --cache-budget` chose (--per-layer-from).
The table goes to stdout, the frontier to a PNG.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import calibration_ids, checkpoint_config

from tpa_model.checkpoints.loader import load_model
from tpa_model.checkpoints.named_models import resolve_model
from tpa_model.compression.convert import reduce_rank, to_per_token_svd
from tpa_model.compression.rank_allocation import cache_fraction
from tpa_model.evaluation.quality import QualityReport, evaluate, frontier_points, plot_frontier
from tpa_model.tokenizers.hf_tokenizer import load_tokenizer

UNIFORM = {0.70: (2, 2), 0.52: (2, 1), 0.35: (1, 1)}  # the (k, v) ranks that store these fractions at G=3, d=64
HARNESS = dict(eval_tokens=2048, seq_len=512, chat_prompts=4, greedy_tokens=32, passkey_lengths=(512, 1024),
               passkey_trials=1)  # CPU-sized: 2048 tokens, 4 chat prompts, 6 passkey trials per model


def variants(source: Path, cal: torch.Tensor, per_layer_from: list[Path]) -> dict[str, Callable[[], object]]:
    """name -> a function building that candidate model."""

    def uniform(ranks, **kw):
        def build():
            model = load_model(source)
            reduce_rank(model, *ranks, progress=False, **kw)
            return model
        return build

    def svd(ranks):
        def build():
            model = load_model(source)
            to_per_token_svd(model, *ranks)
            return model
        return build

    def per_layer(config):
        def build():
            ranks = [config.layer_ranks(i) for i in range(config.num_hidden_layers)]
            model = load_model(source)
            reduce_rank(model, [k for k, _ in ranks], [v for _, v in ranks], calibration_ids=cal, fit="attention",
                        progress=False)
            return model
        return build

    out: dict[str, Callable[[], object]] = {"exact 100%": lambda: load_model(source)}
    for fraction, ranks in UNIFORM.items():
        pct = round(fraction * 100)
        out[f"weight-space {pct}%"] = uniform(ranks)
        out[f"activation-aware {pct}%"] = uniform(ranks, calibration_ids=cal)
        out[f"attention-aware {pct}%"] = uniform(ranks, calibration_ids=cal, fit="attention")
        out[f"per-token SVD {pct}%"] = svd(ranks)
    for checkpoint in per_layer_from:
        config = checkpoint_config(checkpoint)
        out[f"per-layer attention-aware {round(cache_fraction(config) * 100)}%"] = per_layer(config)
    return out


def series_of(name: str) -> str:
    return name.rsplit(" ", 1)[0] if name.endswith("%") else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--per-layer-from", type=Path, nargs="*", default=[],
                        help="TPA checkpoints whose ranks per layer (chosen by tpa-convert --cache-budget) to measure "
                             "with the attention-aware basis")
    parser.add_argument("--healed", type=Path, nargs="*", default=[],
                        help="healed TPA checkpoints to add, each labelled by its directory's name")
    parser.add_argument("--only", nargs="*", default=None, help="measure only these variants (names as printed)")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/quality/<model>")
    parser.add_argument("--png", type=Path, default=None, help="default: docs/quality_frontier_<model>.png")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    source = resolve_model(args.model)
    out = args.out or Path("bench/results/quality") / args.model
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(source)
    original = load_model(source)
    cal = calibration_ids(tokenizer, args.calibration_tokens)
    builders = variants(source, cal, args.per_layer_from)
    for path in args.healed:
        builders[path.name] = lambda path=path: load_model(path)
    reports: dict[str, QualityReport] = {}
    for name, build in builders.items():
        file = out / (name.replace(" ", "_").replace("%", "pct") + ".json")
        if file.is_file():
            reports[name] = QualityReport.from_json(file)
            continue
        if args.only is not None and name not in args.only:
            continue
        t0 = time.perf_counter()
        candidate = build()
        report = evaluate(original, candidate, tokenizer, **HARNESS)
        report.to_json(file)
        reports[name] = report
        print(f"{name}: cache {report.cache_fraction:.3f}, perplexity {report.perplexity_change:+.1%}, "
              f"KL {report.kl:.3f}, passkey {report.passkey_accuracy():.0%} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    print_table(reports)
    series: dict[str, list] = {}
    for name, report in reports.items():
        points = frontier_points([report], "perplexity", False)
        series.setdefault(series_of(name), []).extend((x, y) for x, y, *_ in points)
    png = args.png or Path("docs") / f"quality_frontier_{args.model}.png"
    plot_frontier(series, png, metric="perplexity", log_y=True,
                  title=f"{args.model}: perplexity on held-out prose against cache size")
    print(f"frontier written to {png}; reports in {out}")
    return 0


def print_table(reports: dict[str, QualityReport]) -> None:
    head = f"| {'variant':<36} | cache | perplexity | change | KL | top-1 | greedy | passkey |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, r in sorted(reports.items(), key=lambda kv: (-kv[1].cache_fraction, kv[0])):
        print(f"| {name:<36} | {r.cache_fraction:.1%} | {r.perplexity_candidate:.2f} | "
              f"{r.perplexity_change:+.1%} | {r.kl:.3f} | {r.top1_agreement:.1%} | {r.greedy_agreement:.1%} | "
              f"{r.passkey_accuracy():.0%} (orig {r.passkey_accuracy('original'):.0%}) |")


if __name__ == "__main__":
    raise SystemExit(main())
