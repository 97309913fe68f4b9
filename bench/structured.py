"""What a structured output costs per decode step: the engine's sampling of B rows of real-vocabulary logits,
plain, against the same with every row held to a JSON Schema (llguidance's token mask computed and applied,
the drawn token fed back to each row's matcher).

The model is left out on purpose: its forward is the same on both sides, so the difference of the two is the
whole overhead, to set against a step's time on the machine that serves (a CPU step of Gemma 3 270M is tens of
milliseconds, a GPU step a few). Logits are random, so the matchers walk through varied JSON; a matcher that
completes its object starts again. Sides alternate within each cell.

Usage: OMP_NUM_THREADS=1 python bench/structured.py [--models gemma-3-270m smollm2] [--batches 1 8 32]
       [--steps 50] [--rounds 3] [--out bench/results/structured.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, median  # noqa: E402

from server.engine.structured import StructuredOutputs, consume  # noqa: E402
from tpa_model.checkpoints.named_models import resolve_model  # noqa: E402
from tpa_model.sampling import SamplingParams, StructuredOutput, sample  # noqa: E402
from tpa_model.tokenizers.hf_tokenizer import load_tokenizer  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


class Cell:
    """B rows of logits over one model's vocabulary, sampled `steps` times, with or without the constraint."""

    def __init__(self, structured: StructuredOutputs, vocab: int, batch: int, steps: int):
        gen = torch.Generator().manual_seed(batch)
        self.structured, self.steps = structured, steps
        self.spec = StructuredOutput(json_schema=json.dumps(SCHEMA))
        self.logits = [torch.randn(batch, vocab, generator=gen) * 4 for _ in range(steps)]
        self.params = [SamplingParams(temperature=1.0, seed=i) for i in range(batch)]
        self.matchers = [structured.matcher(self.spec) for _ in range(batch)]

    def draw(self, logits: torch.Tensor) -> list[int]:
        empty = [[] for _ in self.params]
        return sample(logits, self.params, [None] * len(self.params), empty, empty).token_ids

    def plain(self) -> float:
        start = time.perf_counter()
        for logits in self.logits:
            self.draw(logits.clone())
        return (time.perf_counter() - start) / self.steps

    def constrained(self) -> float:
        start = time.perf_counter()
        for logits in self.logits:
            logits = logits.clone()
            self.structured.mask(logits, list(enumerate(self.matchers)))
            for row, token in enumerate(self.draw(logits)):
                if consume(self.matchers[row], token):
                    self.matchers[row] = self.structured.matcher(self.spec)
        return (time.perf_counter() - start) / self.steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/structured.json"))
    args = parser.parse_args(argv)

    rows = []
    print(f"{'model':>14} {'vocab':>7} {'batch':>5} {'plain ms':>9} {'JSON ms':>9} {'overhead ms':>11} {'x plain':>8}")
    for name in args.models:
        tokenizer = load_tokenizer(resolve_model(name))
        structured = StructuredOutputs(tokenizer, tokenizer.vocab_size, tokenizer.stop_token_ids)
        start = time.perf_counter()
        structured.compile(StructuredOutput(json_schema=json.dumps(SCHEMA)))
        first_compile = time.perf_counter() - start
        for batch in args.batches:
            cell = Cell(structured, tokenizer.vocab_size, batch, args.steps)
            times = alternate({"plain": cell.plain, "constrained": cell.constrained}, args.rounds)
            plain, constrained = median(times["plain"]) * 1e3, median(times["constrained"]) * 1e3
            row = dict(model=name, vocab=tokenizer.vocab_size, batch=batch, plain_ms=plain, constrained_ms=constrained,
                       overhead_ms=constrained - plain, ratio=constrained / plain, first_compile_s=first_compile)
            rows.append(row)
            print(f"{name:>14} {row['vocab']:>7} {batch:>5} {plain:>9.2f} {constrained:>9.2f} "
                  f"{row['overhead_ms']:>11.2f} {row['ratio']:>7.2f}x")
        print(f"{name}: first compile (reads the vocabulary) {first_compile:.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "steps": args.steps, "rounds": args.rounds,
                                    "schema": SCHEMA, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
