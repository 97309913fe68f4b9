"""Offline throughput: continuous batching against one request at a time, same engine, same process.

Usage: python bench/offline_throughput.py [--model DIR] [--requests 64] [--max-tokens 64] [--device cpu]
Without --model it uses the built-in tiny demo model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from server.engine.engine import EngineConfig
from server.engine.llm import LLM
from tpa_model.sampling import SamplingParams


def timed(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int, list]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs), outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/offline_throughput.json"))
    args = parser.parse_args()

    config = EngineConfig(max_num_seqs=args.max_num_seqs, cache_memory_gib=0.25)
    llm = LLM(args.model, dtype=getattr(torch, args.dtype), device=args.device, engine_config=config)
    gen = torch.Generator().manual_seed(0)
    vocab = llm.tokenizer.vocab_size
    prompts = [[llm.tokenizer.bos_id] + torch.randint(10, vocab, (int(n),), generator=gen).tolist()
               for n in torch.randint(16, 256, (args.requests,), generator=gen)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    timed(llm, prompts[:2], params)  # warm-up
    batched_s, batched_tokens, batched = timed(llm, prompts, params)
    single_s, single_tokens, single = 0.0, 0, []
    for p in prompts:
        s, n, out = timed(llm, [p], params)
        single_s, single_tokens = single_s + s, single_tokens + n
        single += out
    same = all(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(batched, single))

    rows = [
        {"mode": "continuous batching", "seconds": batched_s, "output_tokens": batched_tokens,
         "tokens_per_s": batched_tokens / batched_s},
        {"mode": "one request at a time", "seconds": single_s, "output_tokens": single_tokens,
         "tokens_per_s": single_tokens / single_s},
    ]
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"{args.requests} requests, {args.max_tokens} output tokens each, model {llm.model_path}, "
          f"{args.device} {args.dtype}")
    print(f"{'mode':<24} {'seconds':>8} {'tokens':>7} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['mode']:<24} {r['seconds']:>8.2f} {r['output_tokens']:>7} {r['tokens_per_s']:>9.1f}")
    print(f"ratio: {ratio:.2f}x; identical greedy tokens in both modes: {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "ratio": ratio, "identical_tokens": same,
                                    "settings": vars(args) | {"out": str(args.out), "model": str(llm.model_path)}},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
