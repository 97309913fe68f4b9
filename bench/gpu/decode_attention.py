"""Decode attention time per layer on a GPU: the Triton backend on factor and standard caches, against the
PyTorch reference backend and a standard paged GQA cache read by PyTorch's scaled_dot_product_attention.

One global (full-context) layer at the head shapes of Gemma 3 12b (16 query / 8 kv heads of 256) and 27b
(32 / 16 of 128), bf16. Every sequence of the batch holds `context` cached tokens in shuffled blocks and
decodes one query. Sides, each timed with CUDA events (median of several calls after a warm-up):
    triton        our kernels (TritonBackend.decode) on each layout: factors kR vR and standard (plain K/V)
    reference     our PyTorch reference backend on the same cache (skipped beyond --reference-max-tokens)
    sdpa paged    a standard paged cache: K and V gathered through the block table, then SDPA (GQA)
    sdpa static   SDPA on K and V already contiguous (a static cache; the floor of any SDPA path)
Bandwidth: the cache bytes the step must read (bytes per token of the layout x tokens) over the time, as a
fraction of a measured device-to-device copy (bytes read + written over its time). Targets from issue 11:
>= 70% of copy bandwidth at long context; beyond 8k tokens, triton on factors faster than sdpa paged by at
least 0.7 x the ratio of bytes read.

Usage: python bench/gpu/decode_attention.py [--shapes 12b 27b] [--batches 1 8 32 128]
       [--contexts 1024 8192 32768 131072] [--ranks 1 2 4] [--out bench/results/gpu_decode_attention.json]
       python bench/gpu/decode_attention.py --smoke   (tiny shapes on the CPU under Triton's interpreter:
                                                       checks the script, measures nothing)
Needs CUDA (exit 2 without it, unless --smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"12b": (16, 8, 256), "27b": (32, 16, 128), "tiny": (4, 2, 16)}  # (query heads, kv heads, head_dim)
BLOCK = 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["12b", "27b"], choices=SHAPES)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 128])
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192, 32768, 131072])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4], help="R_K = R_V of the factor layouts")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reference-max-tokens", type=int, default=1 << 21,
                   help="skip the reference backend above this many cached tokens in a step (it is slow)")
    p.add_argument("--memory-fraction", type=float, default=0.8, help="of free memory a cell may allocate")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (default: bench/results/gpu_decode_attention.json; none in --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.batches, args.contexts, args.ranks, args.dtype = ["tiny"], [2], [40], [1], "float32"
    return args


class Timer:
    """Milliseconds per call: CUDA events on a GPU, the wall clock in --smoke."""

    def __init__(self, device: torch.device, budget_s: float = 0.3):
        self.cuda = device.type == "cuda"
        self.budget_s = budget_s

    def __call__(self, fn) -> float:
        fn()  # warm-up (and compilation)
        first = self.once(fn)
        reps = max(3, min(50, int(self.budget_s * 1e3 / max(first, 1e-3))))
        return statistics.median(self.once(fn) for _ in range(reps))

    def once(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)


def copy_bandwidth(device: torch.device, timer: Timer) -> float | None:
    """Bytes per second of a device-to-device copy of 1 GiB (read + written); None off a GPU."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * (1 << 30) / (ms * 1e-3)


class Cell:
    """One layer's cache for `batch` sequences of `context` tokens, shuffled block tables, the step's
    metadata and queries."""

    def __init__(self, shape, ranks, batch, context, dtype, device, seed=0):
        from tpa_model.backends.reference import ReferenceBackend
        from tpa_model.kv_cache import CacheSpec, KVCache
        from tpa_model.metadata import build_metadata

        H, G, d = shape
        self.spec = CacheSpec(G, d, min(ranks[0], G), min(ranks[1], G), None, dtype)
        blocks = -(-context // BLOCK)
        self.kv = KVCache([self.spec], {"global": batch * blocks}, BLOCK, device)
        gen = torch.Generator(device=device).manual_seed(seed)
        for t in self.kv.layers[0].tensors():
            t.normal_(0, 0.5, generator=gen)
        order = torch.randperm(batch * blocks, generator=gen, device=device).view(batch, blocks).tolist()
        self.meta = build_metadata(self.kv, ReferenceBackend(), [context - 1] * batch, [1] * batch, [order],
                                   list(range(batch)), device=device)
        self.q = torch.randn(batch, H, d, generator=gen, device=device).to(dtype)
        self.tokens = batch * context
        layer = self.kv.layers[0]
        self.bytes_per_token = layer.nbytes / (batch * blocks * BLOCK)

    def decode(self, backend):
        layer, pool = self.kv.layers[0], self.meta.pools[0]
        return lambda: backend.decode(self.q, layer, pool, self.meta, 0.0625)


def sdpa_sides(cell: Cell, timer: Timer, static: bool) -> dict[str, float]:
    """A standard paged cache read by SDPA: gathered through the block table each step, and (memory
    permitting) already contiguous."""
    import torch.nn.functional as F

    from tpa_model.backends.reference import gather_plain

    kv, pool = cell.kv.layers[0], cell.meta.pools[0]
    q = cell.q.unsqueeze(2)  # [B, H, 1, d]

    def gathered():
        k = gather_plain(kv.k[0], pool.block_tables, BLOCK).transpose(0, 1)  # [B, G, T, d]
        v = gather_plain(kv.v[0], pool.block_tables, BLOCK).transpose(0, 1)
        return k, v

    def paged():
        k, v = gathered()
        return F.scaled_dot_product_attention(q, k, v, scale=0.0625, enable_gqa=True)

    out = {"sdpa_paged_ms": timer(paged)}
    if static:
        k, v = (t.contiguous() for t in gathered())
        out["sdpa_static_ms"] = timer(lambda: F.scaled_dot_product_attention(q, k, v, scale=0.0625,
                                                                              enable_gqa=True))
        del k, v
    return out


def cell_bytes(shape, ranks, batch, context, elt) -> int:
    H, G, d = shape
    per_token = sum(r * (G + d) if r < G else G * d for r in ranks)
    return batch * context * per_token * elt


def fits(nbytes: int, device: torch.device, fraction: float) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


def run_cell(name, shape, layout, batch, context, args, device, dtype, timer, copy_bw) -> dict:
    from tpa_model.backends.reference import ReferenceBackend
    from tpa_model.backends.triton_decode import TritonBackend

    H, G, d = shape
    ranks = (G, G) if layout == "standard" else (layout, layout)
    row = {"shape": name, "layout": "standard" if layout == "standard" else f"k{layout} v{layout}",
           "batch": batch, "context": context}
    elt = torch.finfo(dtype).bits // 8
    standard = layout == "standard"
    # a standard cell also holds a gathered copy for sdpa paged and a contiguous one for sdpa static
    need = cell_bytes(shape, ranks, batch, context, elt) * (3 if standard else 1)
    if not fits(need, device, args.memory_fraction):
        return row | {"skipped": f"needs {need / 2**30:.1f} GiB"}
    cell = Cell(shape, ranks, batch, context, dtype, device)
    row["bytes_per_token"] = cell.bytes_per_token
    row["triton_ms"] = timer(cell.decode(TritonBackend()))
    if cell.tokens <= args.reference_max_tokens:
        row["reference_ms"] = timer(cell.decode(ReferenceBackend()))
    if standard:
        row |= sdpa_sides(cell, timer, static=fits(need, device, args.memory_fraction))
    seconds = row["triton_ms"] * 1e-3
    row["triton_gbps"] = cell.tokens * cell.bytes_per_token / seconds / 1e9
    row["fraction_of_copy"] = row["triton_gbps"] * 1e9 / copy_bw if copy_bw else None
    del cell
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> None:
    """Per factor row: speed-up over sdpa paged at the same cell, and the ratio of bytes read."""
    standard = {(r["shape"], r["batch"], r["context"]): r for r in rows if r["layout"] == "standard"}
    for r in rows:
        s = standard.get((r["shape"], r["batch"], r["context"]))
        if r["layout"] == "standard" or not s or "triton_ms" not in r or "sdpa_paged_ms" not in s:
            continue
        r["speedup_vs_sdpa_paged"] = s["sdpa_paged_ms"] / r["triton_ms"]
        r["bytes_ratio"] = s["bytes_per_token"] / r["bytes_per_token"]


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':>5} {'layout':>9} {'batch':>5} {'context':>7} {'triton':>9} {'reference':>9} "
          f"{'sdpa pg':>9} {'sdpa st':>9} {'GB/s':>7} {'of copy':>7} {'x sdpa':>6} {'bytes x':>7}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['shape']:>5} {r['layout']:>9} {r['batch']:>5} {r['context']:>7} skipped: {r['skipped']}")
            continue
        print(f"{r['shape']:>5} {r['layout']:>9} {r['batch']:>5} {r['context']:>7} {fmt(r['triton_ms']):>9} "
              f"{fmt(r.get('reference_ms')):>9} {fmt(r.get('sdpa_paged_ms')):>9} {fmt(r.get('sdpa_static_ms')):>9} "
              f"{fmt(r['triton_gbps'], '.0f'):>7} {fmt(r.get('fraction_of_copy'), '.2f'):>7} "
              f"{fmt(r.get('speedup_vs_sdpa_paged'), '.2f'):>6} {fmt(r.get('bytes_ratio'), '.1f'):>7}")
    print("times in ms per layer and step; GB/s: cache bytes read by triton / its time; of copy: that over a "
          "device-to-device copy's bandwidth")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    elif not torch.cuda.is_available():
        print("bench/gpu/decode_attention.py needs a CUDA device (torch.cuda.is_available() is False): nothing "
              "was measured. Run it on a GPU, or with --smoke to check the script on the CPU.", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    import triton

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = getattr(torch, args.dtype)
    timer = Timer(device, budget_s=0.0 if args.smoke else 0.3)
    copy_bw = copy_bandwidth(device, timer)
    rows = []
    for name in args.shapes:
        for context in args.contexts:
            for batch in args.batches:
                for layout in ["standard", *args.ranks]:
                    rows.append(run_cell(name, SHAPES[name], layout, batch, context, args, device, dtype, timer,
                                         copy_bw))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    add_ratios(rows)
    print_table(rows)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    result = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
              "dtype": args.dtype, "block_size": BLOCK, "copy_gbps": copy_bw and copy_bw / 1e9, "smoke": args.smoke,
              "rows": rows}
    out = args.out or (None if args.smoke else ROOT / "bench/results/gpu_decode_attention.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    print(f"device {device_name}; copy bandwidth {fmt(copy_bw and copy_bw / 1e9, '.0f')} GB/s; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
