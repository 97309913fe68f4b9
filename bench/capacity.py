"""Cache capacity of the Gemma 3 presets: bytes per token and concurrent long sessions in a fixed memory.

Sizes come from the real allocator's block layout, allocated on the meta device (no weights, no GPU).
With --measure-engine, it also checks the start-up capacity line against what the engine really admits: an
engine on the benchmark checkpoint (bench/common.py) at each rank, its cache filled with sessions that grow
to --engine-session-len tokens in lockstep, counting how many reach that length together.

Usage: python bench/capacity.py [--memory-gib 40] [--session-len 32768] [--out bench/results/capacity.json]
       python bench/capacity.py --measure-engine [--engine-memory-gib 0.05] [--engine-session-len 2048]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tpa_model.cache.capacity import sessions_in_memory, standard_layout, tpa_layout
from tpa_model.model.config import preset

RANKS = [(1, 1), (2, 2), (4, 4)]


def measure_engine(memory_gib: float, session_len: int) -> list[dict]:
    """Sessions the start-up line announces against sessions that reach session_len together."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import bench_model_dir

    from server.engine.engine import EngineConfig, LLMEngine
    from tpa_model.checkpoints.loader import load_model
    from tpa_model.sampling import SamplingParams
    from tpa_model.tokenizers.gemma_tokenizer import GemmaTokenizer

    path = bench_model_dir()
    rows = []
    for rank in ("exact", "2", "1"):
        model = load_model(path, **({} if rank == "exact" else {"k_rank": int(rank), "v_rank": int(rank)}))
        config = EngineConfig(max_model_len=session_len, cache_memory_gib=memory_gib, max_num_seqs=256,
                              max_num_batched_tokens=4096)
        engine = LLMEngine(model, GemmaTokenizer.from_dir(path), config)
        announced = engine.capacity.engine_limit
        prompt_len = 16
        params = SamplingParams(max_tokens=session_len - prompt_len, temperature=0.0, ignore_eos=True)
        for i in range(announced + 4):
            engine.add_request(f"r{i}", [2] + [10 + i % 100] * (prompt_len - 1), params)
        together = 0
        while engine.has_unfinished():
            engine.step()
            together = max(together, sum(s.num_computed >= session_len - 2 for s in engine.scheduler.running))
        rows.append({"rank": rank, "announced": announced, "reached_together": together,
                     "standard_in_same_memory": engine.capacity.standard_sessions,
                     "line": engine.capacity.format()})
        print(f"rank {rank:>5}: the start-up line announces {announced} sessions of {session_len} tokens; "
              f"{together} reached that length together (a standard cache: {engine.capacity.standard_sessions})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-gib", type=float, default=40.0)
    parser.add_argument("--session-len", type=int, default=32_768)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/results/capacity.json"))
    parser.add_argument("--measure-engine", action="store_true")
    parser.add_argument("--engine-memory-gib", type=float, default=0.05)
    parser.add_argument("--engine-session-len", type=int, default=2048)
    args = parser.parse_args()
    if args.measure_engine:
        rows = measure_engine(args.engine_memory_gib, args.engine_session_len)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"memory_gib": args.memory_gib, "session_len": args.session_len, "block_size": args.block_size,
                "dtype": "bfloat16"}
    args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
