"""Decode step time against context length and batch size: our engine's forward at each cache layout against
transformers' Gemma3ForCausalLM with its default DynamicCache, on the same random weights.

Every sequence of the batch holds `context` cached tokens (random keys and values; a sliding-window layer holds
its window) and decodes one token. Ours: a paged cache with shuffled block tables, the step's metadata built
from them, then the model's forward. Sides alternate within each cell. Two host-side times are reported on
their own: building the step's metadata, and the engine's whole host step (schedule, block bookkeeping,
packed inputs and metadata, advance) for the same batch, on a model on the meta device (no forward).

--cache-dtypes adds the cache-dtype axis: for every rank, the same step over a cache stored as int8, fp8_e4m3,
int4 or K/V (int8/int4), as sides of the same alternation, each reported as a ratio to the same rank's cache in
the model's dtype (auto), with the spread of the per-round ratios. Every cache is filled through the attention
backend's write path from the same random keys and values, so a quantized cache holds the quantized copy of
what the auto cache holds (and fp8 bytes are always valid numbers).

Usage: OMP_NUM_THREADS=1 python bench/decode_step.py [--contexts 1024 4096 ...] [--batches 1 8 64]
       [--ranks exact 2 1] [--cache-dtypes int8 fp8_e4m3 int4] [--rounds 3] [--out bench/results/decode_step.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, bench_model_dir, median, reference_model, timed  # noqa: E402

from tpa_model.cache.backends import default_backend  # noqa: E402
from tpa_model.cache.kv_cache import (  # noqa: E402
    KVCache,
    LayerKV,
    group_pools,
    layer_cache_specs,
    max_blocks_per_seq,
)
from tpa_model.cache.metadata import build_metadata  # noqa: E402
from tpa_model.cache.quantization import AUTO, KVCacheDtype  # noqa: E402
from tpa_model.checkpoints.loader import load_model  # noqa: E402

BLOCK = 16
FILL_CHUNK = 4096  # slots written per call of the fill


def parse_kv(name: str) -> KVCacheDtype:
    """'int8' (keys and values) or 'int8/int4' (keys / values)."""
    k, _, v = name.partition("/")
    return KVCacheDtype.parse(k, v or None)


def fill_random(backend, layer: LayerKV, gen: torch.Generator, device) -> None:
    """Every slot of a layer from random keys and values (0.5 N(0, 1)), written through the backend's write
    path: a quantized part is quantized there, with its scales beside it. The draws depend only on the layer's
    shape, so caches of the same layout in different cache dtypes hold the same numbers."""
    spec = layer.spec
    shapes = spec.part_shapes()
    nk = 2 if spec.k_factored else 1
    slots = layer.k[-1].shape[0] if spec.k_factored else layer.k[-1].shape[1]
    for start in range(0, slots, FILL_CHUNK):
        idx = torch.arange(start, min(slots, start + FILL_CHUNK), device=device)
        parts = [(torch.randn(len(idx), *shape, generator=gen) * 0.5).to(device, spec.dtype) for shape in shapes]
        backend.write(layer, idx, tuple(parts[:nk]), tuple(parts[nk:]))


class OurStep:
    """One decode step of B sequences at `context` tokens through the paged cache, stored as cache_dtype says."""

    def __init__(self, model, batch: int, context: int, seed: int = 0, cache_dtype: KVCacheDtype = AUTO):
        gen = torch.Generator().manual_seed(seed)
        self.model = model
        self.backend = default_backend(model.device)
        specs = layer_cache_specs(model.config, model.dtype, cache_dtype)
        pools = group_pools(specs)
        per_seq = {p.name: max_blocks_per_seq(context + 1, BLOCK, p.window) for p in pools}
        self.kv = KVCache(specs, {p: batch * n for p, n in per_seq.items()}, BLOCK, model.device)
        for layer in self.kv.layers:
            fill_random(self.backend, layer, gen, model.device)
        self.tables = []
        for p in pools:
            n, total = per_seq[p.name], -(-(context + 1) // BLOCK)
            order = torch.randperm(batch * n, generator=gen).tolist()
            self.tables.append([[-1] * (total - n) + order[b * n : (b + 1) * n] for b in range(batch)])
        self.batch, self.context = batch, context
        self.ids = torch.randint(0, model.config.vocab_size, (batch,), generator=gen)

    def metadata(self):
        B = self.batch
        return build_metadata(self.kv, self.backend, [self.context] * B, [1] * B, self.tables, list(range(B)))

    @torch.inference_mode()
    def __call__(self) -> float:
        return timed(lambda: self.model(self.ids, (meta := self.metadata()).positions, meta))


def engine_host_step(config, tokenizer_dir: Path, batch: int, context: int, rounds: int) -> float:
    """Seconds of host work per decode step of the real engine at this batch and context."""
    from server.engine.engine import EngineConfig, LLMEngine
    from tpa_model.model.decoder import GemmaTPAModel
    from tpa_model.sampling import SamplingParams
    from tpa_model.tokenizers.gemma_tokenizer import GemmaTokenizer

    with torch.device("meta"):
        model = GemmaTPAModel(config)
    budget, longest = 2048, context + rounds + 2
    blocks = {"global": batch * -(-longest // BLOCK),
              "sliding": batch * max_blocks_per_seq(longest, BLOCK, config.sliding_window, budget)}
    engine = LLMEngine(model, GemmaTokenizer.from_dir(tokenizer_dir), EngineConfig(
        block_size=BLOCK, max_num_seqs=batch, max_model_len=longest, num_blocks=blocks,
        max_num_batched_tokens=budget))
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=rounds + 2, temperature=0.0, ignore_eos=True)
    for b in range(batch):
        engine.add_request(f"r{b}", torch.randint(3, config.vocab_size, (context,), generator=gen).tolist(), params)
    scheduler, times = engine.scheduler, []
    while len(times) < rounds:
        start = time.perf_counter()
        chunks = scheduler.schedule()
        engine.runner.prepare(chunks)
        for c in chunks:
            scheduler.advance(c)
        if all(c.length == 1 for c in chunks):
            times.append(time.perf_counter() - start)
        for c in chunks:
            if c.samples:
                c.seq.output_ids.append(5)
    return median(times)


class ReferenceStep:
    """The same step in transformers: a DynamicCache filled with random keys and values, one new token each."""

    def __init__(self, model, batch: int, context: int, seed: int = 0):
        import transformers

        gen = torch.Generator().manual_seed(seed)
        c = model.config
        self.model = model
        self.cache = transformers.DynamicCache(config=c)
        shape = (batch, c.num_key_value_heads, context, c.head_dim)
        for layer in range(c.num_hidden_layers):
            k, v = (torch.randn(shape, generator=gen) * 0.5 for _ in range(2))
            self.cache.update(k, v, layer)
        self.ids = torch.randint(0, c.vocab_size, (batch, 1), generator=gen)

    @torch.inference_mode()
    def __call__(self) -> float:
        pos = self.cache.get_seq_length()
        position = torch.full((self.ids.shape[0], 1), pos)
        return timed(lambda: self.model(self.ids, past_key_values=self.cache, position_ids=position,
                                        cache_position=torch.tensor([pos]), use_cache=True))


def bench_model(path: Path, rank: str):
    """'exact', 'R' (a head basis of rank R) or 'svdR' (per-token SVD factors of rank R)."""
    from tpa_model.compression.convert import to_per_token_svd

    if rank == "exact":
        return load_model(path)
    if rank.startswith("svd"):
        model = load_model(path)
        to_per_token_svd(model, int(rank[3:]), int(rank[3:]))
        return model
    return load_model(path, k_rank=int(rank), v_rank=int(rank))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--ranks", nargs="+", default=["exact", "2", "1"],
                        help="exact, R (head basis of rank R) or svdR (per-token SVD factors of rank R)")
    parser.add_argument("--cache-dtypes", nargs="*", default=[],
                        help="quantized caches to time against each rank's auto cache: int8, fp8_e4m3, int4, K/V")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-cells-tokens", type=int, default=64 * 8192,
                        help="skip cells whose batch x context exceeds this (memory)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode_step.json"))
    args = parser.parse_args()

    path = bench_model_dir()
    ours = {r: bench_model(path, r) for r in args.ranks}
    quantized = {name: parse_kv(name) for name in args.cache_dtypes}
    reference = reference_model(path)
    rows, dtype_lines = [], []
    print(f"model {path} (float32, {torch.get_num_threads()} thread(s)); step time in ms, median of {args.rounds}")
    header = f"{'batch':>5} {'context':>7} {'transformers':>12}" + "".join(
        f" {'rank ' + r:>10} {'x':>6}" for r in args.ranks) + f" {'host meta':>10} {'meta %':>7} {'host step':>10}"
    print(header)
    for batch in args.batches:
        for context in args.contexts:
            if batch * context > args.max_cells_tokens:
                continue
            sides = {"transformers": ReferenceStep(reference, batch, context)}
            for r, m in ours.items():
                sides[f"rank {r}"] = OurStep(m, batch, context)
                for name, kv in quantized.items():
                    sides[f"rank {r} {name}"] = OurStep(m, batch, context, cache_dtype=kv)
            for run in sides.values():
                run()  # warm-up
            each = alternate(sides, args.rounds)
            times = {k: median(v) for k, v in each.items()}
            exact = sides.get(f"rank {args.ranks[0]}")
            meta_s = median([timed(exact.metadata) for _ in range(args.rounds)])
            host_s = engine_host_step(exact.model.config, path, batch, context, args.rounds)
            row = {"batch": batch, "context": context, "seconds": times, "host_metadata_seconds": meta_s,
                   "engine_host_step_seconds": host_s,
                   "speedup_vs_transformers": {k: times["transformers"] / t for k, t in times.items()}}
            if quantized:
                row["vs_auto_cache"] = {}
                for r in args.ranks:
                    auto = f"rank {r}"
                    for name in quantized:
                        side = f"{auto} {name}"
                        per_round = sorted(q / a for q, a in zip(each[side], each[auto]))
                        row["vs_auto_cache"][side] = {"ratio_of_medians": times[side] / times[auto],
                                                      "round_ratios": per_round}
                        dtype_lines.append(
                            f"{batch:>5} {context:>7} {r:>6} {sides[side].kv.layers[0].spec.layout:<32} "
                            f"{times[auto] * 1e3:>9.1f} {times[side] * 1e3:>9.1f} {times[side] / times[auto]:>7.3f}x "
                            f"{per_round[0]:>7.3f}-{per_round[-1]:.3f}")
            rows.append(row)
            line = f"{batch:>5} {context:>7} {times['transformers'] * 1e3:>12.1f}"
            for r in args.ranks:
                t = times[f"rank {r}"]
                line += f" {t * 1e3:>10.1f} {times['transformers'] / t:>5.2f}x"
            line += f" {meta_s * 1e3:>9.2f}ms {100 * meta_s / times[f'rank {args.ranks[0]}']:>6.1f}%"
            line += f" {host_s * 1e3:>8.2f}ms"
            print(line, flush=True)
            if quantized:
                print("\n".join(dtype_lines[-len(args.ranks) * len(quantized):]), flush=True)
            del sides
    if quantized:
        dtype = str(next(iter(ours.values())).dtype).removeprefix("torch.")
        print(f"\ncache dtypes against the same rank's {dtype} cache (auto), same process, "
              f"sides alternating; ms are medians of {args.rounds}; spread: lowest-highest per-round ratio")
        print(f"{'batch':>5} {'context':>7} {'rank':>6} {'cache':<32} {'auto ms':>9} {'ms':>9} {'x auto':>8} "
              f"{'spread':>13}")
        print("\n".join(dtype_lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"threads": torch.get_num_threads(),
                                                                        "model": str(path), "block_size": BLOCK}
    args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
