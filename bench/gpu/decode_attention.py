"""Decode attention time per layer on a GPU: the Triton backend on factor and standard caches, against the
PyTorch reference backend and a standard paged GQA cache read by PyTorch's scaled_dot_product_attention.

One global (full-context) layer at the head shapes of Gemma 3 12b (16 query / 8 kv heads of 256) and 27b
(32 / 16 of 128), bf16, with the cache stored in bf16 (auto) or quantized (--cache-dtypes: int8, fp8_e4m3,
int4; keys and values alike, filled through the write path's quantizer). Every sequence of the batch holds
`context` cached tokens in shuffled blocks and decodes one query. Sides, each timed with CUDA events (median
of several calls after a warm-up):
    triton        our kernels (TritonBackend.decode) on each layout: factors kR vR and standard (plain K/V)
    reference     our PyTorch reference backend on the same cache (skipped beyond --reference-max-tokens)
    sdpa paged    a standard paged cache: K and V gathered through the block table, then SDPA (GQA)
    sdpa static   SDPA on K and V already contiguous (a static cache; the floor of any SDPA path)
    flashinfer    FlashInfer's paged decode (BatchDecodeWithPagedKVCacheWrapper) on a standard cache of 16-token
                  pages, when flashinfer imports (else the row says why it was skipped)
    flash-attn    flash-attn's flash_attn_with_kvcache on a standard cache of 256-token pages (its smallest),
                  when flash_attn imports
The two libraries read their own layout of the same keys and values (copied once, untimed); each side's output
is checked against the Triton backend's (max_err) so that a misconfigured call cannot pass as a fast one; the
reference's too, where it runs (reference_max_err). A quantized cell is timed for triton and the reference only
(the SDPA and library sides read a bf16 cache), and compared with the auto cell of the same layout: x auto is
the auto cell's triton time over its own, bytes x the ratio of bytes per token.
Bandwidth: the cache bytes the step must read (bytes per token of the layout x tokens) over the time, as a
fraction of a measured device-to-device copy (bytes read + written over its time). Targets from issue 11:
>= 70% of copy bandwidth at long context; beyond 8k tokens, triton on factors faster than sdpa paged by at
least 0.7 x the ratio of bytes read.

Usage: python bench/gpu/decode_attention.py [--shapes 12b 27b] [--batches 1 8 32 128]
       [--contexts 1024 8192 32768 131072] [--ranks 1 2 4] [--cache-dtypes auto int8 fp8_e4m3 int4]
       [--out bench/results/gpu_decode_attention.json]
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
SCALE = 0.0625
FLASH_ATTN_PAGE = 256  # flash-attn's paged KV needs pages of a multiple of 256 tokens
CACHE_DTYPES = ("auto", "int8", "fp8_e4m3", "int4")
FILL_SLOTS = 1 << 14  # slots quantized at a time when a quantized cache is filled (bounds the float32 copy)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["12b", "27b"], choices=SHAPES)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 128])
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192, 32768, 131072])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4], help="R_K = R_V of the factor layouts")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--cache-dtypes", nargs="+", default=["auto"], choices=CACHE_DTYPES,
                   help="how keys and values are stored; quantized cells are compared with the auto cell")
    p.add_argument("--reference-max-tokens", type=int, default=1 << 21,
                   help="skip the reference backend above this many cached tokens in a step (it is slow)")
    p.add_argument("--memory-fraction", type=float, default=0.8, help="of free memory a cell may allocate")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (default: bench/results/gpu_decode_attention.json; none in --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.batches, args.contexts, args.ranks, args.dtype = ["tiny"], [2], [40], [1], "float32"
        args.cache_dtypes = ["auto", "int4"]
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


def cell_spec(shape, ranks, dtype, cache_dtype="auto"):
    from tpa_model.cache.kv_cache import CacheSpec

    H, G, d = shape
    return CacheSpec(G, d, min(ranks[0], G), min(ranks[1], G), None, dtype, cache_dtype, cache_dtype)


def fill_normal(layer, gen: torch.Generator) -> None:
    """Normal numbers (std 0.5) in every slot; a quantized part's rows are quantized as the write path does,
    FILL_SLOTS slots at a time, their scales beside them."""
    from tpa_model.cache.quantization import is_quantized, quantize

    for part in ("k", "v"):
        stored, kind = getattr(layer, part), layer.spec.cache_dtype(part)
        for t in stored[:-1]:  # head factors
            t.normal_(0, 0.5, generator=gen)
        if not is_quantized(kind):
            stored[-1].normal_(0, 0.5, generator=gen)
            continue
        data, scale = stored[-1], layer.scale(part)
        slot_dim = 0 if len(stored) == 2 else 1  # token factors [slots, R, w], plain rows [G, slots, w]
        for lo in range(0, data.shape[slot_dim], FILL_SLOTS):
            n = min(FILL_SLOTS, data.shape[slot_dim] - lo)
            rows_shape = data.narrow(slot_dim, lo, n).shape[:-1]
            rows = torch.empty(*rows_shape, layer.spec.head_dim, device=data.device).normal_(0, 0.5, generator=gen)
            q, s = quantize(rows, kind)
            data.narrow(slot_dim, lo, n).copy_(q)
            scale.narrow(slot_dim, lo, n).copy_(s)


def bytes_per_token(spec) -> int:
    """A layer's cache bytes per token slot (data, head factors and scales), measured on the meta device."""
    from tpa_model.cache.kv_cache import LayerKV

    return LayerKV(spec, 1, "meta").nbytes


class Cell:
    """One layer's cache for `batch` sequences of `context` tokens, stored as `cache_dtype` (keys and values),
    shuffled block tables, the step's metadata and queries."""

    def __init__(self, shape, ranks, batch, context, dtype, device, seed=0, cache_dtype="auto"):
        from tpa_model.cache.backends.reference import ReferenceBackend
        from tpa_model.cache.kv_cache import KVCache
        from tpa_model.cache.metadata import build_metadata

        H, G, d = shape
        self.spec = cell_spec(shape, ranks, dtype, cache_dtype)
        blocks = -(-context // BLOCK)
        self.kv = KVCache([self.spec], {"global": batch * blocks}, BLOCK, device)
        gen = torch.Generator(device=device).manual_seed(seed)
        fill_normal(self.kv.layers[0], gen)
        order = torch.randperm(batch * blocks, generator=gen, device=device).view(batch, blocks).tolist()
        self.meta = build_metadata(self.kv, ReferenceBackend(), [context - 1] * batch, [1] * batch, [order],
                                   list(range(batch)), device=device)
        self.q = torch.randn(batch, H, d, generator=gen, device=device).to(dtype)
        self.context, self.blocks = context, blocks
        self.tokens = batch * context
        layer = self.kv.layers[0]
        self.bytes_per_token = layer.nbytes / (batch * blocks * BLOCK)

    def decode(self, backend):
        layer, pool = self.kv.layers[0], self.meta.pools[0]
        return lambda: backend.decode(self.q, layer, pool, self.meta, SCALE)


def sdpa_sides(cell: Cell, timer: Timer, static: bool) -> dict[str, float]:
    """A standard paged cache read by SDPA: gathered through the block table each step, and (memory
    permitting) already contiguous."""
    import torch.nn.functional as F

    from tpa_model.cache.backends.reference import gather_plain

    kv, pool = cell.kv.layers[0], cell.meta.pools[0]
    q = cell.q.unsqueeze(2)  # [B, H, 1, d]

    def gathered():
        k = gather_plain(kv.k[0], pool.block_tables, BLOCK).transpose(0, 1)  # [B, G, T, d]
        v = gather_plain(kv.v[0], pool.block_tables, BLOCK).transpose(0, 1)
        return k, v

    def paged():
        k, v = gathered()
        return F.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True)

    out = {"sdpa_paged_ms": timer(paged)}
    if static:
        k, v = (t.contiguous() for t in gathered())
        out["sdpa_static_ms"] = timer(lambda: F.scaled_dot_product_attention(q, k, v, scale=SCALE,
                                                                              enable_gqa=True))
        del k, v
    return out


def flashinfer_layout(cell: Cell):
    """The cell's standard cache as FlashInfer reads it: K and V [pages, G, BLOCK, d] (HND), and its CSR page
    table (indptr [B + 1], the cell's block tables as page indices, tokens in each last page [B])."""
    kv, tables = cell.kv.layers[0], cell.meta.pools[0].block_tables[:, :cell.blocks]
    G, _, d = kv.k[0].shape
    B, device = cell.q.shape[0], cell.q.device
    k, v = (store.view(G, -1, BLOCK, d).transpose(0, 1).contiguous() for store in (kv.k[0], kv.v[0]))
    indptr = torch.arange(B + 1, dtype=torch.int32, device=device) * cell.blocks
    last_page = torch.full((B,), cell.context - (cell.blocks - 1) * BLOCK, dtype=torch.int32, device=device)
    return k, v, indptr, tables.reshape(-1).to(torch.int32), last_page


def flashinfer_decode(cell: Cell):
    """FlashInfer's batch decode (BatchDecodeWithPagedKVCacheWrapper, planned once) on flashinfer_layout."""
    import flashinfer

    k, v, indptr, indices, last_page = flashinfer_layout(cell)
    H, (G, d) = cell.q.shape[1], k.shape[1::2]
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=k.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "HND")
    wrapper.plan(indptr, indices, last_page, H, G, d, BLOCK, q_data_type=cell.q.dtype, kv_data_type=k.dtype,
                 sm_scale=SCALE)
    return lambda: wrapper.run(cell.q, (k, v))


def flash_attn_layout(cell: Cell, seed: int = 0):
    """The cell's standard cache as flash-attn reads it: K and V [pages, FLASH_ATTN_PAGE, G, d] with the pages
    in shuffled order, the block table [B, pages per sequence] and the lengths [B]."""
    from tpa_model.cache.backends.reference import gather_plain

    kv, tables = cell.kv.layers[0], cell.meta.pools[0].block_tables[:, :cell.blocks]
    B, device = cell.q.shape[0], cell.q.device
    per_seq = -(-cell.context // FLASH_ATTN_PAGE)
    gen = torch.Generator(device=device).manual_seed(seed)
    order = torch.randperm(B * per_seq, generator=gen, device=device)

    def paged(store):  # [G, slots, d] -> sequence b's page j at order[b * per_seq + j]
        dense = gather_plain(store, tables, BLOCK).permute(1, 2, 0, 3)  # [B, T, G, d]
        dense = torch.nn.functional.pad(dense, (0, 0, 0, 0, 0, per_seq * FLASH_ATTN_PAGE - dense.shape[1]))
        pages = torch.empty_like(dense).view(B * per_seq, FLASH_ATTN_PAGE, *dense.shape[2:])
        pages[order] = dense.reshape(pages.shape)
        return pages

    lengths = torch.full((B,), cell.context, dtype=torch.int32, device=device)
    return paged(kv.k[0]), paged(kv.v[0]), order.view(B, per_seq).to(torch.int32), lengths


def flash_attn_decode(cell: Cell):
    """flash-attn's flash_attn_with_kvcache on flash_attn_layout."""
    from flash_attn import flash_attn_with_kvcache

    k, v, table, lengths = flash_attn_layout(cell)
    q = cell.q.unsqueeze(1)  # [B, 1, H, d]
    return lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=lengths, block_table=table,
                                           softmax_scale=SCALE).squeeze(1)


LIBRARIES = {"flashinfer": flashinfer_decode, "flash_attn": flash_attn_decode}


def library_sides(cell: Cell, timer: Timer, expected: torch.Tensor, room: bool) -> dict:
    """Each library's time and its largest difference from the Triton output, or why it was skipped."""
    out = {}
    for name, build in LIBRARIES.items():
        if not room:
            out[f"{name}_skipped"] = "no memory for its copy of the cache"
            continue
        try:
            step = build(cell)
            out[f"{name}_max_err"] = (step().float() - expected.float()).abs().max().item()
            out[f"{name}_ms"] = timer(step)
        except Exception as e:  # not installed, or no kernel for this shape, device or dtype
            out[f"{name}_skipped"] = f"{type(e).__name__}: {e}"[:200]
        step = None  # frees the library's copy of the cache before the next one is made
    return out


def fits(nbytes: int, device: torch.device, fraction: float) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


def run_cell(name, shape, layout, batch, context, args, device, dtype, timer, copy_bw, cache_dtype="auto") -> dict:
    from tpa_model.cache.backends.reference import ReferenceBackend
    from tpa_model.cache.backends.triton_decode import TritonBackend

    H, G, d = shape
    ranks = (G, G) if layout == "standard" else (layout, layout)
    row = {"shape": name, "layout": "standard" if layout == "standard" else f"k{layout} v{layout}",
           "cache_dtype": cache_dtype, "batch": batch, "context": context}
    # a standard bf16 cell also holds a gathered copy for sdpa paged and a contiguous one for sdpa static
    with_sdpa = layout == "standard" and cache_dtype == "auto"
    cache = batch * -(-context // BLOCK) * BLOCK * bytes_per_token(cell_spec(shape, ranks, dtype, cache_dtype))
    need = cache * (3 if with_sdpa else 1)
    if not fits(need, device, args.memory_fraction):
        return row | {"skipped": f"needs {need / 2**30:.1f} GiB"}
    cell = Cell(shape, ranks, batch, context, dtype, device, cache_dtype=cache_dtype)
    row["bytes_per_token"] = cell.bytes_per_token
    triton_step = cell.decode(TritonBackend())
    row["triton_ms"] = timer(triton_step)
    if cell.tokens <= args.reference_max_tokens:
        reference_step = cell.decode(ReferenceBackend())
        row["reference_max_err"] = (reference_step().float() - triton_step().float()).abs().max().item()
        row["reference_ms"] = timer(reference_step)
    if with_sdpa:
        row |= sdpa_sides(cell, timer, static=fits(need, device, args.memory_fraction))
        # flash-attn's copy is made through a gathered one: two more caches at once, at most
        room = fits(cache * 2, device, args.memory_fraction)
        row |= library_sides(cell, timer, triton_step(), room)
    seconds = row["triton_ms"] * 1e-3
    row["triton_gbps"] = cell.tokens * cell.bytes_per_token / seconds / 1e9
    row["fraction_of_copy"] = row["triton_gbps"] * 1e9 / copy_bw if copy_bw else None
    del cell
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> None:
    """Per quantized row: speed-up over the auto (bf16) cell of the same layout, and the ratio of bytes read.
    Per factor row: speed-up over sdpa paged and over the faster library at the same cell (its standard bf16
    cache), and the ratio of bytes read (a quantized factor row's own ratios are then the ones over auto)."""
    auto = {(r["shape"], r["layout"], r["batch"], r["context"]): r for r in rows if r["cache_dtype"] == "auto"}
    for r in rows:
        a = auto.get((r["shape"], r["layout"], r["batch"], r["context"]))
        if r["cache_dtype"] != "auto" and a and "triton_ms" in r and "triton_ms" in a:
            r["speedup_vs_auto"] = a["triton_ms"] / r["triton_ms"]
            r["bytes_ratio_vs_auto"] = a["bytes_per_token"] / r["bytes_per_token"]
    standard = {(r["shape"], r["batch"], r["context"]): r for r in rows
                if r["layout"] == "standard" and r["cache_dtype"] == "auto"}
    for r in rows:
        s = standard.get((r["shape"], r["batch"], r["context"]))
        if r["layout"] == "standard" or not s or "triton_ms" not in r or "sdpa_paged_ms" not in s:
            continue
        r["speedup_vs_sdpa_paged"] = s["sdpa_paged_ms"] / r["triton_ms"]
        r["bytes_ratio"] = s["bytes_per_token"] / r["bytes_per_token"]
        timed = [(s[f"{name}_ms"], name) for name in LIBRARIES if f"{name}_ms" in s]
        if timed:
            ms, r["fastest_library"] = min(timed)
            r["speedup_vs_library"] = ms / r["triton_ms"]


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':>5} {'layout':>9} {'kv':>8} {'batch':>5} {'context':>7} {'triton':>9} {'reference':>9} "
          f"{'sdpa pg':>9} {'sdpa st':>9} {'flashinf':>9} {'flash-at':>9} {'GB/s':>7} {'of copy':>7} "
          f"{'x sdpa':>6} {'x lib':>6} {'bytes x':>7} {'x auto':>6} {'bytes xa':>8}")
    for r in rows:
        head = f"{r['shape']:>5} {r['layout']:>9} {r['cache_dtype']:>8} {r['batch']:>5} {r['context']:>7}"
        if "skipped" in r:
            print(f"{head} skipped: {r['skipped']}")
            continue
        print(f"{head} {fmt(r['triton_ms']):>9} "
              f"{fmt(r.get('reference_ms')):>9} {fmt(r.get('sdpa_paged_ms')):>9} {fmt(r.get('sdpa_static_ms')):>9} "
              f"{fmt(r.get('flashinfer_ms')):>9} {fmt(r.get('flash_attn_ms')):>9} "
              f"{fmt(r['triton_gbps'], '.0f'):>7} {fmt(r.get('fraction_of_copy'), '.2f'):>7} "
              f"{fmt(r.get('speedup_vs_sdpa_paged'), '.2f'):>6} {fmt(r.get('speedup_vs_library'), '.2f'):>6} "
              f"{fmt(r.get('bytes_ratio'), '.1f'):>7} {fmt(r.get('speedup_vs_auto'), '.2f'):>6} "
              f"{fmt(r.get('bytes_ratio_vs_auto'), '.2f'):>8}")
    print("times in ms per layer and step; kv: how the cache is stored; GB/s: cache bytes read by triton / its "
          "time; of copy: that over a device-to-device copy's bandwidth; x lib: over the faster of flashinfer and "
          "flash-attn; x sdpa, bytes x: against the standard bf16 cache; x auto, bytes xa: against the auto "
          "(bf16) cell of the same layout")
    reasons = {f"{name}: {r[name + '_skipped']}" for r in rows for name in LIBRARIES if name + "_skipped" in r}
    for reason in sorted(reasons):
        print("skipped", reason)


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
                    for cache_dtype in args.cache_dtypes:
                        rows.append(run_cell(name, SHAPES[name], layout, batch, context, args, device, dtype, timer,
                                             copy_bw, cache_dtype))
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    add_ratios(rows)
    print_table(rows)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    result = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
              "dtype": args.dtype, "cache_dtypes": args.cache_dtypes, "block_size": BLOCK,
              "copy_gbps": copy_bw and copy_bw / 1e9, "smoke": args.smoke, "rows": rows}
    out = args.out or (None if args.smoke else ROOT / "bench/results/gpu_decode_attention.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    print(f"device {device_name}; copy bandwidth {fmt(copy_bw and copy_bw / 1e9, '.0f')} GB/s; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
