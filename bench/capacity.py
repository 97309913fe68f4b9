"""Cache capacity of the Gemma 3 presets: bytes per token and concurrent long sessions in a fixed memory.

Sizes come from the real allocator's block layout, allocated on the meta device (no weights, no GPU), so a
quantized cache's scales count as they are stored. Two tables: every layout in bf16, then the cache dtypes
(bf16, int8, fp8_e4m3, int4, and int8 keys with int4 values) for the standard cache (window freeing) and the
factor caches, as sessions in the same memory next to the bf16 standard cache.
With --measure-engine, it also checks the start-up capacity line against what the engine really admits: an
engine on the benchmark checkpoint (bench/common.py) at each rank and cache dtype (--engine-cache-dtypes), its
cache filled with sessions that grow to --engine-session-len tokens in lockstep, counting how many reach that
length together.

Usage: python bench/capacity.py [--memory-gib 40] [--session-len 32768] [--out bench/results/capacity.json]
       python bench/capacity.py --measure-engine [--engine-memory-gib 0.05] [--engine-session-len 2048]
           [--engine-ranks exact 2 1] [--engine-cache-dtypes auto int8 int4 int8/int4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tpa_model.cache.capacity import sessions_in_memory, standard_layout, tpa_layout
from tpa_model.cache.quantization import KVCacheDtype
from tpa_model.model.config import preset

RANKS = [(1, 1), (2, 2), (4, 4)]
# column label -> how keys and values are stored ("bf16": the model's dtype, bfloat16 here)
CACHE_DTYPES = {"bf16": KVCacheDtype(), "int8": KVCacheDtype("int8", "int8"),
                "fp8": KVCacheDtype("fp8_e4m3", "fp8_e4m3"), "int4": KVCacheDtype("int4", "int4"),
                "k8 v4": KVCacheDtype("int8", "int4")}


def parse_kv(name: str) -> KVCacheDtype:
    """'int8' (keys and values) or 'int8/int4' (keys / values)."""
    k, _, v = name.partition("/")
    return KVCacheDtype.parse(k, v or None)


def measure_engine(memory_gib: float, session_len: int, ranks: list[str], cache_dtypes: list[str]) -> list[dict]:
    """Sessions the start-up line announces against sessions that reach session_len together, at every rank
    and cache dtype."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import bench_model_dir

    from server.engine.engine import EngineConfig, LLMEngine
    from tpa_model.checkpoints.loader import load_model
    from tpa_model.sampling import SamplingParams
    from tpa_model.tokenizers.gemma_tokenizer import GemmaTokenizer

    path = bench_model_dir()
    rows = []
    for rank, name in ((r, n) for r in ranks for n in cache_dtypes):
        model = load_model(path, **({} if rank == "exact" else {"k_rank": int(rank), "v_rank": int(rank)}))
        kv = parse_kv(name)
        config = EngineConfig(max_model_len=session_len, cache_memory_gib=memory_gib, max_num_seqs=256,
                              max_num_batched_tokens=4096, kv_cache_dtype=kv.k, v_cache_dtype=kv.v)
        engine = LLMEngine(model, GemmaTokenizer.from_dir(path), config)
        announced = engine.capacity.engine_limit
        prompt_len = 16
        params = SamplingParams(max_tokens=session_len - prompt_len, temperature=0.0, ignore_eos=True)
        for i in range(announced + 4):
            engine.add_request(f"r{i}", [2] + [10 + i % 100] * (prompt_len - 1), params)
        together = 0
        while engine.has_unfinished():
            engine.step()
            now = sum(s.num_computed >= session_len - 2 for s in engine.scheduler.running)
            if together and not now:
                break  # the first wave has finished: the requests left over run with fewer beside them
            together = max(together, now)
        rows.append({"rank": rank, "cache_dtype": kv.name(), "sessions": engine.capacity.sessions,
                     "announced": announced, "reached_together": together, "agrees": together == announced,
                     "standard_in_same_memory": engine.capacity.standard_sessions,
                     "bytes_per_token": engine.capacity.bytes_per_token, "line": engine.capacity.format()})
        print(f"rank {rank:>5}, {kv.name():<16}: the start-up line announces {announced} sessions of {session_len} "
              f"tokens; {together} reached that length together (a standard cache in {model.dtype}: "
              f"{engine.capacity.standard_sessions}; {engine.capacity.bytes_per_token:.0f} bytes per token)",
              flush=True)
    return rows


def dtype_rows(memory: int, session_len: int, block_size: int) -> list[dict]:
    """Sessions of every cache shape (standard with window freeing, factors below full rank) at every cache
    dtype of CACHE_DTYPES, in bf16 models, next to the bf16 standard cache in the same memory."""
    dtype = torch.bfloat16
    rows = []
    for name in ("1b", "4b", "12b", "27b"):
        cfg = preset(name)
        shapes = [("standard", None)] + [(f"TPA k{k} v{v}", cfg.with_ranks(k, v)) for k, v in RANKS
                                         if k < cfg.num_key_value_heads]
        baseline = sessions_in_memory(standard_layout(cfg, dtype, block_size), memory, session_len)
        for shape, ranked in shapes:
            row = {"model": name, "kv_heads": cfg.num_key_value_heads, "cache": shape, "cells": {}}
            for label, kv in CACHE_DTYPES.items():
                if ranked is None:
                    layout = standard_layout(cfg, dtype, block_size, cache_dtype=kv)
                else:
                    layout = tpa_layout(ranked, dtype, block_size, kv)
                sessions = sessions_in_memory(layout, memory, session_len)
                row["cells"][label] = {"cache_dtype": kv.name(), "layout": layout.name,
                                       "bytes_per_token": layout.session_bytes(session_len) / session_len,
                                       "block_bytes": layout.block_bytes, "sessions": sessions,
                                       "vs_bf16_standard": sessions / baseline if baseline else float("inf")}
            rows.append(row)
    return rows


def print_dtype_rows(rows: list[dict], memory_gib: float, session_len: int, block_size: int) -> None:
    labels = list(CACHE_DTYPES)
    print(f"\nbf16 models, {memory_gib:g} GiB of cache, sessions of {session_len} tokens, block {block_size}: "
          "sessions (x the bf16 standard cache, window freeing)")
    print(f"{'model':>5} {'G':>3} {'cache':<14}" + "".join(f" {label:>14}" for label in labels))
    for r in rows:
        cells = "".join(f" {c['sessions']:>6} ({c['vs_bf16_standard']:>5.2f}x)" for c in r["cells"].values())
        print(f"{r['model']:>5} {r['kv_heads']:>3} {r['cache']:<14}{cells}")
    print("bytes per token (all layers, one session; quantized parts with their float16 scales)")
    print(f"{'model':>5} {'G':>3} {'cache':<14}" + "".join(f" {label:>14}" for label in labels))
    for r in rows:
        print(f"{r['model']:>5} {r['kv_heads']:>3} {r['cache']:<14}"
              + "".join(f" {c['bytes_per_token']:>14.1f}" for c in r["cells"].values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-gib", type=float, default=40.0)
    parser.add_argument("--session-len", type=int, default=32_768)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/results/capacity.json"))
    parser.add_argument("--measure-engine", action="store_true")
    parser.add_argument("--engine-memory-gib", type=float, default=0.05)
    parser.add_argument("--engine-session-len", type=int, default=2048)
    parser.add_argument("--engine-ranks", nargs="+", default=["exact", "2", "1"])
    parser.add_argument("--engine-cache-dtypes", nargs="+", default=["auto"],
                        help="cache dtypes of the engine check: auto, int8, fp8_e4m3, int4, or K/V (int8/int4)")
    args = parser.parse_args()
    if args.measure_engine:
        rows = measure_engine(args.engine_memory_gib, args.engine_session_len, args.engine_ranks,
                              args.engine_cache_dtypes)
        out = args.out.with_name("capacity_engine.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"settings": vars(args) | {"out": str(out)}, "rows": rows}, indent=2) + "\n")
        print(f"wrote {out}")
        return
    memory = int(args.memory_gib * 2**30)
    dtype = torch.bfloat16
    rows = []
    for name in ("1b", "4b", "12b", "27b"):
        cfg = preset(name)
        layouts = [standard_layout(cfg, dtype, args.block_size, False), standard_layout(cfg, dtype, args.block_size)]
        for k, v in RANKS:
            if k < cfg.num_key_value_heads or (k, v) == (1, 1):  # full rank is the standard layout
                layouts.append(tpa_layout(cfg.with_ranks(k, v), dtype, args.block_size))
        baseline = sessions_in_memory(layouts[1], memory, args.session_len)
        for layout in layouts:
            sessions = sessions_in_memory(layout, memory, args.session_len)
            rows.append({
                "model": name,
                "kv_heads": cfg.num_key_value_heads,
                "cache": layout.name,
                "bytes_per_token": layout.session_bytes(args.session_len) / args.session_len,
                "session_gib": layout.session_bytes(args.session_len) / 2**30,
                "sessions": sessions,
                "vs_standard_window": sessions / baseline if baseline else float("inf"),
            })
    header = (f"{'model':>5} {'G':>3} {'cache':<36} {'bytes/token':>12} {'GiB/session':>12} {'sessions':>9} "
              f"{'x std(win)':>10}")
    print(f"bf16, {args.memory_gib:g} GiB of cache, sessions of {args.session_len} tokens, block {args.block_size}")
    print(header)
    for r in rows:
        print(f"{r['model']:>5} {r['kv_heads']:>3} {r['cache']:<36} {r['bytes_per_token']:>12.1f} "
              f"{r['session_gib']:>12.3f} {r['sessions']:>9} {r['vs_standard_window']:>10.2f}")
    by_dtype = dtype_rows(memory, args.session_len, args.block_size)
    print_dtype_rows(by_dtype, args.memory_gib, args.session_len, args.block_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"memory_gib": args.memory_gib, "session_len": args.session_len, "block_size": args.block_size,
                "dtype": "bfloat16"}
    args.out.write_text(json.dumps({"settings": settings, "rows": rows, "cache_dtype_rows": by_dtype}, indent=2)
                        + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
