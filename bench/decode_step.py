"""Decode step time against context length and batch size: our engine's forward at each cache layout against
transformers' Gemma3ForCausalLM with its default DynamicCache, on the same random weights.

Every sequence of the batch holds `context` cached tokens (random keys and values; a sliding-window layer holds
its window) and decodes one token. Ours: a paged cache with shuffled block tables, the step's metadata built
from them, then the model's forward. Sides alternate within each cell. Two host-side times are reported on
their own: building the step's metadata, and the engine's whole host step (schedule, block bookkeeping,
packed inputs and metadata, advance) for the same batch, on a model on the meta device (no forward).

Usage: OMP_NUM_THREADS=1 python bench/decode_step.py [--contexts 1024 4096 ...] [--batches 1 8 64]
       [--ranks exact 2 1] [--rounds 3] [--out bench/results/decode_step.json]
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
from tpa_model.cache.kv_cache import KVCache, group_pools, layer_cache_specs, max_blocks_per_seq  # noqa: E402
from tpa_model.cache.metadata import build_metadata  # noqa: E402
from tpa_model.checkpoints.loader import load_model  # noqa: E402

BLOCK = 16


class OurStep:
    """One decode step of B sequences at `context` tokens through the paged cache."""

    def __init__(self, model, batch: int, context: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.model = model
        specs = layer_cache_specs(model.config, model.dtype)
        pools = group_pools(specs)
        per_seq = {p.name: max_blocks_per_seq(context + 1, BLOCK, p.window) for p in pools}
        self.kv = KVCache(specs, {p: batch * n for p, n in per_seq.items()}, BLOCK, model.device)
        for layer in self.kv.layers:
            for t in layer.tensors():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
        self.tables = []
        for p in pools:
            n, total = per_seq[p.name], -(-(context + 1) // BLOCK)
            order = torch.randperm(batch * n, generator=gen).tolist()
            self.tables.append([[-1] * (total - n) + order[b * n : (b + 1) * n] for b in range(batch)])
        self.batch, self.context = batch, context
        self.backend = default_backend(model.device)
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-cells-tokens", type=int, default=64 * 8192,
                        help="skip cells whose batch x context exceeds this (memory)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode_step.json"))
    args = parser.parse_args()

    path = bench_model_dir()
    ours = {r: bench_model(path, r) for r in args.ranks}
    reference = reference_model(path)
    rows = []
    print(f"model {path} (float32, {torch.get_num_threads()} thread(s)); step time in ms, median of {args.rounds}")
    header = f"{'batch':>5} {'context':>7} {'transformers':>12}" + "".join(
        f" {'rank ' + r:>10} {'x':>6}" for r in args.ranks) + f" {'host meta':>10} {'meta %':>7} {'host step':>10}"
    print(header)
    for batch in args.batches:
        for context in args.contexts:
            if batch * context > args.max_cells_tokens:
                continue
            sides = {"transformers": ReferenceStep(reference, batch, context)}
            sides |= {f"rank {r}": OurStep(m, batch, context) for r, m in ours.items()}
            for run in sides.values():
                run()  # warm-up
            times = {k: median(v) for k, v in alternate(sides, args.rounds).items()}
            exact = sides.get(f"rank {args.ranks[0]}")
            meta_s = median([timed(exact.metadata) for _ in range(args.rounds)])
            host_s = engine_host_step(exact.model.config, path, batch, context, args.rounds)
            row = {"batch": batch, "context": context, "seconds": times, "host_metadata_seconds": meta_s,
                   "engine_host_step_seconds": host_s,
                   "speedup_vs_transformers": {k: times["transformers"] / t for k, t in times.items()}}
            rows.append(row)
            line = f"{batch:>5} {context:>7} {times['transformers'] * 1e3:>12.1f}"
            for r in args.ranks:
                t = times[f"rank {r}"]
                line += f" {t * 1e3:>10.1f} {times['transformers'] / t:>5.2f}x"
            line += f" {meta_s * 1e3:>9.2f}ms {100 * meta_s / times[f'rank {args.ranks[0]}']:>6.1f}%"
            line += f" {host_s * 1e3:>8.2f}ms"
            print(line, flush=True)
            del sides
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"threads": torch.get_num_threads(),
                                                                        "model": str(path), "block_size": BLOCK}
    args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
