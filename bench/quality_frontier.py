"""Quality against cache size for a real model: every conversion method at 100%, 70%, 52% and 35% of a
standard cache, and healed checkpoints, measured by the quality harness on held-out prose; with
--cache-dtypes, every one of them again with its cache stored in each cache dtype.

    OMP_NUM_THREADS=2 python bench/quality_frontier.py --model smollm2 [--healed DIR ...]
    OMP_NUM_THREADS=1 python bench/quality_frontier.py --model smollm2 --only "exact 100%" "per-token SVD 35%" \
        --cache-dtypes auto int8 fp8_e4m3 int4 int8/int4 --eval-tokens 4096 --passkey-lengths 1024 2048

For a model with G kv heads and head_dim d, one part (K or V) of a layer stores G*d numbers per token plain
and R*(G + d) as rank-R factors. On SmolLM2 (G=3, d=64): ranks (2,2) store 70%, (2,1) 52%, (1,1) 35%. The
per-layer rows choose a rank per layer under the same budgets from measured sensitivity (calibration text).

Each variant's report is written to bench/results/quality/<model>/<variant>.json as it finishes, and a
variant whose file exists is read back instead of measured again, so the run can be split across sessions.
Per-layer rows measure the ranks per layer that `tpa-convert --cache-budget` chose (--per-layer-from).
The table goes to stdout, the frontier to a PNG.

The cache-dtype axis (--cache-dtypes): `K` stores keys and values as K, `K/V` keys as K and values as V (auto,
int8, fp8_e4m3, int4: tpa_model/cache/quantization.py). Each variant is measured once per cache dtype, its
report named "<variant>, <dtype>" (the auto one keeps the variant's name), and the run writes its table as
JSON (table.json in --out) and one PNG holding two frontiers, perplexity and passkey retrieval against the
cache per token as a fraction of a bf16 standard cache, one line per conversion and cache dtype. Such a run
keeps its reports in bench/results/quality/<model>-cache-dtypes by default, apart from the table above (its
harness is set by the flags below, not HARNESS).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import calibration_ids, checkpoint_config

from tpa_model.cache.quantization import KVCacheDtype
from tpa_model.checkpoints.loader import load_model
from tpa_model.checkpoints.named_models import resolve_model
from tpa_model.compression.convert import reduce_rank, to_per_token_svd
from tpa_model.compression.rank_allocation import cache_fraction
from tpa_model.evaluation import texts
from tpa_model.evaluation.quality import (
    DEFAULT_DEPTHS,
    PASSKEY_ANSWER_TOKENS,
    Passkey,
    PasskeyResult,
    QualityReport,
    evaluate,
    frontier_points,
    passkey_results,
    plot_frontier,
    point_label,
)
from tpa_model.tokenizers.hf_tokenizer import load_tokenizer

EXACT = "exact"  # the series of the exact model ("exact 100%")
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


def parse_cache_dtype_spec(spec: str) -> KVCacheDtype:
    """"int8" (keys and values) or "int8/int4" (keys int8, values int4)."""
    k, _, v = spec.partition("/")
    return KVCacheDtype.parse(k, v or None)


def dtype_variant(name: str, cache_dtype: KVCacheDtype) -> str:
    """A variant's name with its cache dtype: "exact 100%, k int8, v int4"; the auto one keeps its name."""
    return name if not cache_dtype.quantized else f"{name}, {cache_dtype.name()}"


def report_file(out: Path, name: str) -> Path:
    return out / (name.replace(" ", "_").replace("%", "pct").replace(",", "") + ".json")


def harness(args: argparse.Namespace) -> dict:
    """The harness of a cache-dtype run (its flags), or HARNESS for the method frontier."""
    if not args.cache_dtypes:
        return HARNESS
    return dict(eval_tokens=args.eval_tokens, seq_len=args.seq_len, chat_prompts=args.chat_prompts,
                greedy_tokens=args.greedy_tokens, passkey_lengths=tuple(args.passkey_lengths),
                passkey_depths=tuple(args.passkey_depths), passkey_trials=args.passkey_trials)


def measure(original, candidate, tokenizer, settings: dict, original_file: Path) -> QualityReport:
    """evaluate() without its passkey stage, whose prompts are then run on the candidate alone: the original's
    hits on the same prompts (the same seed, lengths, depths and trials as evaluate would draw) are measured
    once and kept in original_file, since long prompts (Gemma at 8k) dominate a run."""
    lengths = [n for n in settings["passkey_lengths"]
               if n + PASSKEY_ANSWER_TOKENS <= original.config.max_position_embeddings]
    report = evaluate(original, candidate, tokenizer, **{**settings, "passkey_lengths": ()})
    if not lengths:
        return report
    passkey = Passkey.build(tokenizer, texts.documents("eval").values(), 4 * max(lengths))
    key = json.dumps([lengths, settings["passkey_depths"], settings["passkey_trials"], 0])
    known = json.loads(original_file.read_text(encoding="utf-8")) if original_file.is_file() else {}
    t0 = time.perf_counter()
    if key not in known:
        rows = passkey_results(original, original, tokenizer, passkey, lengths, settings["passkey_depths"],
                               settings["passkey_trials"])
        known[key] = [dataclasses.asdict(r) for r in rows]
        original_file.write_text(json.dumps(known, indent=1) + "\n", encoding="utf-8")
    originals = [PasskeyResult(**r) for r in known[key]]
    mine = passkey_results(candidate, candidate, tokenizer, passkey, lengths, settings["passkey_depths"],
                           settings["passkey_trials"])
    merged = [dataclasses.replace(r, original_correct=o.original_correct) for r, o in zip(mine, originals)]
    assert all((r.length, r.depth, r.trials) == (o.length, o.depth, o.trials) for r, o in zip(mine, originals))
    timings = {**report.timings, "passkey retrieval": time.perf_counter() - t0}
    return dataclasses.replace(report, passkey=merged, timings=timings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--per-layer-from", type=Path, nargs="*", default=[],
                        help="TPA checkpoints whose ranks per layer (chosen by tpa-convert --cache-budget) to measure "
                             "with the attention-aware basis")
    parser.add_argument("--healed", type=Path, nargs="*", default=[],
                        help="healed TPA checkpoints to add, each labelled by its directory's name")
    parser.add_argument("--only", nargs="*", default=None, help="measure only these variants (names as printed)")
    parser.add_argument("--cache-dtypes", nargs="+", default=None, metavar="K[/V]",
                        help="measure every variant with its cache stored in each of these: K for keys and values, "
                             "K/V for keys K and values V (auto, int8, fp8_e4m3, int4)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="cache-dtype runs: perplexity/KL tokens")
    parser.add_argument("--seq-len", type=int, default=512, help="cache-dtype runs: tokens per evaluation sequence")
    parser.add_argument("--chat-prompts", type=int, default=8, help="cache-dtype runs: chat prompts continued")
    parser.add_argument("--greedy-tokens", type=int, default=32, help="cache-dtype runs: greedy tokens per prompt")
    parser.add_argument("--passkey-lengths", type=int, nargs="*", default=[512, 1024, 2048],
                        help="cache-dtype runs: passkey prompt lengths")
    parser.add_argument("--passkey-depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS),
                        help="cache-dtype runs: passkey depths")
    parser.add_argument("--passkey-trials", type=int, default=1, help="cache-dtype runs: keys per length and depth")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=None,
                        help="default: bench/results/quality/<model>, or <model>-cache-dtypes with --cache-dtypes")
    parser.add_argument("--png", type=Path, default=None,
                        help="default: docs/quality_frontier_<model>.png, or _dtypes.png with --cache-dtypes")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    source = resolve_model(args.model)
    cache_dtypes = [parse_cache_dtype_spec(spec) for spec in args.cache_dtypes or ["auto"]]
    suffix = "-cache-dtypes" if args.cache_dtypes else ""
    out = args.out or Path("bench/results/quality") / f"{args.model}{suffix}"
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(source)
    original = load_model(source)
    cal = calibration_ids(tokenizer, args.calibration_tokens)
    builders = variants(source, cal, args.per_layer_from)
    for path in args.healed:
        builders[path.name] = lambda path=path: load_model(path)
    settings = harness(args)
    reports: dict[str, QualityReport] = {}
    series: dict[str, tuple[str, str]] = {}  # report name -> (conversion method, cache dtype)
    for base, build in builders.items():
        for cache_dtype in cache_dtypes:
            name = dtype_variant(base, cache_dtype)
            series[name] = series_of(base), cache_dtype.name()
            file = report_file(out, name)
            if file.is_file():
                reports[name] = QualityReport.from_json(file)
                continue
            if args.only is not None and base not in args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            candidate = build()
            candidate.kv_cache_dtype = cache_dtype
            if args.cache_dtypes:
                report = measure(original, candidate, tokenizer, settings, out / "original_passkey.json")
            else:
                report = evaluate(original, candidate, tokenizer, **settings)
            report.to_json(file)
            reports[name] = report
            print(f"{name}: cache {report.cache_fraction:.3f}, perplexity {report.perplexity_change:+.2%}, "
                  f"KL {report.kl:.4f}, passkey {report.passkey_accuracy():.0%} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    if args.cache_dtypes:
        print_dtype_table(reports)
        table = out / "table.json"
        table.write_text(json.dumps(dtype_table(reports), indent=2) + "\n", encoding="utf-8")
        png = args.png or Path("docs") / f"quality_frontier_{args.model}_dtypes.png"
        plot_dtype_frontier(reports, series, png, args.model)
        print(f"frontier written to {png}; table to {table}; reports in {out}")
        return 0
    print_table(reports)
    lines: dict[str, list] = {}
    for name, report in reports.items():
        points = frontier_points([report], "perplexity", False)
        lines.setdefault(series[name][0], []).extend((x, y) for x, y, *_ in points)
    png = args.png or Path("docs") / f"quality_frontier_{args.model}.png"
    plot_frontier(lines, png, metric="perplexity", log_y=True,
                  title=f"{args.model}: perplexity on held-out prose against cache size")
    print(f"frontier written to {png}; reports in {out}")
    return 0


def passkey_counts(report: QualityReport, which: str = "candidate") -> dict[int, str]:
    """"correct/trials" per passkey length."""
    counts = {}
    for length in sorted({r.length for r in report.passkey}):
        rows = [r for r in report.passkey if r.length == length]
        counts[length] = f"{sum(getattr(r, f'{which}_correct') for r in rows)}/{sum(r.trials for r in rows)}"
    return counts


def dtype_row(name: str, r: QualityReport) -> dict:
    """One row of a cache-dtype table: the figures docs/QUALITY.md records."""
    return {"variant": name, "k_rank": r.k_rank, "v_rank": r.v_rank, "kv_cache_dtype": r.kv_cache_dtype,
            "bytes_per_token": r.bytes_per_token_candidate, "bytes_per_token_bf16_standard": r.bytes_per_token_standard,
            "fraction_of_bf16_standard": r.cache_fraction, "sessions_vs_bf16": 1.0 / r.cache_fraction,
            "perplexity_original": r.perplexity_original, "perplexity_candidate": r.perplexity_candidate,
            "perplexity_change": r.perplexity_change, "kl": r.kl, "top1_agreement": r.top1_agreement,
            "greedy_agreement": r.greedy_agreement, "eval_tokens": r.eval_tokens, "session_len": r.session_len,
            "passkey": passkey_counts(r), "passkey_original": passkey_counts(r, "original")}


def dtype_table(reports: dict[str, QualityReport]) -> list[dict]:
    order = sorted(reports.items(), key=lambda kv: (-kv[1].cache_fraction, kv[0]))
    return [dtype_row(name, r) for name, r in order]


def print_dtype_table(reports: dict[str, QualityReport]) -> None:
    rows = dtype_table(reports)
    lengths = sorted({n for row in rows for n in row["passkey"]})
    head = ("| variant | k/v rank | bytes/token | of bf16 | sessions | perplexity | change | KL | top-1 | greedy | "
            + " | ".join(f"passkey {n}" for n in lengths) + " |")
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    for row in rows:
        keys = " | ".join(f"{row['passkey'].get(n, '-')} ({row['passkey_original'].get(n, '-')})" for n in lengths)
        print(f"| {row['variant']} | {row['k_rank']}/{row['v_rank']} | {row['bytes_per_token']:.0f} | "
              f"{row['fraction_of_bf16_standard']:.1%} | {row['sessions_vs_bf16']:.2f}x | "
              f"{row['perplexity_candidate']:.3f} | {row['perplexity_change']:+.2%} | {row['kl']:.4f} | "
              f"{row['top1_agreement']:.1%} | {row['greedy_agreement']:.1%} | {keys} |")


def plot_dtype_frontier(reports: dict[str, QualityReport], series: dict[str, tuple[str, str]], png: Path,
                        model: str) -> Path:
    """One PNG: the perplexity frontier above the passkey one (plot_frontier draws each; the two are stacked).
    One line per conversion method and cache dtype, each starting from the exact model in that dtype."""
    from matplotlib import image
    from PIL import Image

    methods = {series[name][0] for name in reports} - {EXACT} or {EXACT}
    panels = []
    with tempfile.TemporaryDirectory() as tmp:
        for metric, log_y, what in (("perplexity", True, "perplexity on held-out prose"),
                                    ("passkey_accuracy", False, "passkey retrieval")):
            lines: dict[str, list] = {}
            for name, report in reports.items():
                method, dtype = series[name]
                for line in sorted(methods) if method == EXACT else [method]:
                    label = dtype if methods == {EXACT} else f"{line}, {dtype}"
                    lines.setdefault(label, []).extend(
                        (x, y, point_label(report)) for x, y, *_ in frontier_points([report], metric, False))
            path = plot_frontier(lines, Path(tmp) / f"{metric}.png", metric=metric, log_y=log_y,
                                 title=f"{model}: {what} (bf16 cache = 1)")
            panels.append(image.imread(path))
    width = max(p.shape[1] for p in panels)
    padded = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=1.0) for p in panels]
    rgb = (np.concatenate(padded, axis=0)[..., :3] * 255).round().astype(np.uint8)
    Image.fromarray(rgb).quantize(colors=64).save(png, optimize=True)  # a few colours: a small file for docs/
    return png


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
