"""Offline throughput: output tokens per second for a batch of requests, greedy, in one process.

Two comparisons, sides alternating within one process:
- default: our engine with continuous batching against the same engine taking one request at a time
  (--model DIR, default the demo model; prompts of --min-prompt..--max-prompt random tokens);
- --compare-transformers: our engine at each of --ranks against transformers' `generate` on a left-padded
  batch of the same prompts, on the shared random benchmark checkpoint (bench/common.py) unless --model.

Usage:
  OMP_NUM_THREADS=1 python bench/offline_throughput.py [--requests 64] [--max-tokens 64]
  OMP_NUM_THREADS=1 python bench/offline_throughput.py --compare-transformers --requests 32 \\
      --min-prompt 256 --max-prompt 512 --max-tokens 128 [--ranks exact 2 1] [--rounds 2]
--model takes a path or a known model's name (gemma-3-270m, smollm2, demo).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, bench_model_dir, median, reference_model, timed  # noqa: E402

from server.engine.engine import EngineConfig  # noqa: E402
from server.engine.llm import LLM  # noqa: E402
from tpa_model.checkpoints.named_models import resolve_model  # noqa: E402
from tpa_model.sampling import SamplingParams  # noqa: E402


def random_prompts(n: int, lo: int, hi: int, vocab: int, bos: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    return [[bos] + torch.randint(10, vocab, (length - 1,), generator=gen).tolist() for length in lengths]


def make_llm(path, rank: str, args) -> LLM:
    ranks = {} if rank == "exact" else {"k_rank": int(rank), "v_rank": int(rank)}
    path = str(path)
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_prompt + args.max_tokens,
                          cache_memory_gib=args.cache_memory)
    return LLM(path, dtype=getattr(torch, args.dtype), device=args.device, engine_config=config, **ranks)


def ours(llm: LLM, prompts, params) -> tuple[float, int, list[list[int]]]:
    outs = []
    seconds = timed(lambda: outs.extend(llm.generate(prompts, params)))
    return seconds, sum(len(o.outputs[0].token_ids) for o in outs), [o.outputs[0].token_ids for o in outs]


def transformers_generate(model, prompts, max_tokens: int, pad: int) -> tuple[float, int]:
    """One left-padded batch through `generate`, greedy, exactly max_tokens new tokens each."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        seconds = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                               min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad))
    return seconds, len(prompts) * max_tokens


def compare_transformers(args) -> dict:
    path = resolve_model(args.model) if args.model else bench_model_dir()
    llms = {rank: make_llm(path, rank, args) for rank in args.ranks}
    first = next(iter(llms.values()))
    prompts = random_prompts(args.requests, args.min_prompt, args.max_prompt, first.tokenizer.vocab_size,
                             first.tokenizer.bos_id)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    reference = reference_model(path, getattr(torch, args.dtype))
    tokens = args.requests * args.max_tokens
    sides = {"transformers generate": lambda: transformers_generate(reference, prompts, args.max_tokens, 0)[0]}
    sides |= {f"ours, rank {r}": (lambda llm=llm: ours(llm, prompts, params)[0]) for r, llm in llms.items()}
    for llm in llms.values():  # warm-up on two requests' worth
        ours(llm, prompts[:2], params)
    times = alternate(sides, args.rounds)
    base = median(times["transformers generate"])
    rows = [{"side": name, "seconds": ts, "median_seconds": median(ts), "tokens_per_s": tokens / median(ts),
             "vs_transformers": base / median(ts)} for name, ts in times.items()]
    print(f"{args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, {args.max_tokens} output "
          f"tokens each, model {path}, {args.device} {args.dtype}, {torch.get_num_threads()} thread(s)")
    print(f"{'side':<24} {'seconds (each round)':<28} {'tokens/s':>9} {'x transformers':>15}")
    for r in rows:
        each = " ".join(f"{t:.2f}" for t in r["seconds"])
        print(f"{r['side']:<24} {each:<28} {r['tokens_per_s']:>9.1f} {r['vs_transformers']:>14.2f}x")
    return {"rows": rows}


def batching_vs_single(args) -> dict:
    config = EngineConfig(max_num_seqs=args.max_num_seqs, cache_memory_gib=args.cache_memory,
                          max_model_len=args.max_prompt + args.max_tokens)
    llm = LLM(args.model or "demo", dtype=getattr(torch, args.dtype), device=args.device, engine_config=config)
    prompts = random_prompts(args.requests, args.min_prompt, args.max_prompt, llm.tokenizer.vocab_size,
                             llm.tokenizer.bos_id)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    ours(llm, prompts[:2], params)  # warm-up
    batched_s, batched_tokens, batched = ours(llm, prompts, params)
    single_s, single_tokens, single = 0.0, 0, []
    for p in prompts:
        s, n, out = ours(llm, [p], params)
        single_s, single_tokens = single_s + s, single_tokens + n
        single += out
    same = batched == single
    rows = [
        {"mode": "continuous batching", "seconds": batched_s, "output_tokens": batched_tokens,
         "tokens_per_s": batched_tokens / batched_s},
        {"mode": "one request at a time", "seconds": single_s, "output_tokens": single_tokens,
         "tokens_per_s": single_tokens / single_s},
    ]
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"{args.requests} requests, {args.max_tokens} output tokens each, model {llm.model_path}, "
          f"{args.device} {args.dtype}, {torch.get_num_threads()} thread(s)")
    print(f"{'mode':<24} {'seconds':>8} {'tokens':>7} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['mode']:<24} {r['seconds']:>8.2f} {r['output_tokens']:>7} {r['tokens_per_s']:>9.1f}")
    print(f"ratio: {ratio:.2f}x; identical greedy tokens in both modes: {same}")
    return {"rows": rows, "ratio": ratio, "identical_tokens": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--compare-transformers", action="store_true")
    parser.add_argument("--ranks", nargs="+", default=["exact", "2", "1"])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--cache-memory", type=float, default=0.5, help="GiB")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = compare_transformers(args) if args.compare_transformers else batching_vs_single(args)
    out = args.out or Path("bench/results") / ("offline_vs_transformers.json" if args.compare_transformers
                                               else "offline_throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"threads": torch.get_num_threads()}
    out.write_text(json.dumps(result | {"settings": settings}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
