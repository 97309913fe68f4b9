"""Cache capacity of the Gemma 3 presets: bytes per token and concurrent long sessions in a fixed memory.

Sizes come from the real allocator's block layout, allocated on the meta device (no weights, no GPU).
Usage: python bench/capacity.py [--memory-gib 40] [--session-len 32768] [--out bench/results/capacity.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tpa_model.capacity import session_bytes, sessions_in_memory, standard_layout, tpa_layout
from tpa_model.config import preset

RANKS = [(1, 1), (2, 2), (4, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-gib", type=float, default=40.0)
    parser.add_argument("--session-len", type=int, default=32_768)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/results/capacity.json"))
    args = parser.parse_args()
    memory = int(args.memory_gib * 2**30)
    dtype = torch.bfloat16
    rows = []
    for name in ("1b", "4b", "12b", "27b"):
        cfg = preset(name)
        layouts = [standard_layout(cfg, dtype, args.block_size, False), standard_layout(cfg, dtype, args.block_size)]
        for k, v in RANKS:
            if k <= cfg.num_key_value_heads:
                layouts.append(tpa_layout(cfg.with_ranks(k, v), dtype, args.block_size))
        baseline = sessions_in_memory(layouts[1], cfg, memory, args.session_len)
        for layout in layouts:
            sessions = sessions_in_memory(layout, cfg, memory, args.session_len)
            rows.append({
                "model": name,
                "kv_heads": cfg.num_key_value_heads,
                "cache": layout.name,
                "bytes_per_token": session_bytes(layout, cfg, args.session_len) / args.session_len,
                "session_gib": session_bytes(layout, cfg, args.session_len) / 2**30,
                "sessions": sessions,
                "vs_standard_window": sessions / baseline if baseline else float("inf"),
            })
    header = (f"{'model':>5} {'G':>3} {'cache':<34} {'bytes/token':>12} {'GiB/session':>12} {'sessions':>9} "
              f"{'x std(win)':>10}")
    print(f"bf16, {args.memory_gib:g} GiB of cache, sessions of {args.session_len} tokens, block {args.block_size}")
    print(header)
    for r in rows:
        print(f"{r['model']:>5} {r['kv_heads']:>3} {r['cache']:<34} {r['bytes_per_token']:>12.1f} "
              f"{r['session_gib']:>12.3f} {r['sessions']:>9} {r['vs_standard_window']:>10.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"memory_gib": args.memory_gib, "session_len": args.session_len, "block_size": args.block_size,
                "dtype": "bfloat16"}
    args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
