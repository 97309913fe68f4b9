"""What the CPU benchmarks share: one random Gemma 3 checkpoint that both transformers and we load.

The model is saved by transformers' own save_pretrained (random init), so the two sides run the same
weights; the tokenizer is the demo model's (token ids are generated directly, the tokenizer only
detokenizes). Shape: 8 layers (sliding-window pattern 5:1, window 1024), 8 query / 4 kv heads, head_dim 64.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

BENCH_SHAPE = dict(
    vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=4, head_dim=64, query_pre_attn_scalar=64, sliding_window=1024,
    max_position_embeddings=40_960,
)


def bench_model_dir(root: Path = Path("bench/.model"), seed: int = 0) -> Path:
    """Build (once) the random checkpoint and return its directory."""
    import transformers

    from tpa_model.checkpoints.demo import demo_model_dir

    path = root / f"gemma3-bench-s{seed}"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(**BENCH_SHAPE)
    transformers.Gemma3ForCausalLM(config).save_pretrained(path)
    shutil.copy(demo_model_dir() / "tokenizer.model", path / "tokenizer.model")
    return path


def reference_model(path: Path, dtype: torch.dtype = torch.float32):
    """transformers' model of a checkpoint directory or a .gguf file (SDPA attention)."""
    import transformers

    if path.suffix == ".gguf":
        return transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, attn_implementation="sdpa").eval()
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()


def alternate(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each side once per round, in turn (A B A B ...), and collect the seconds each reports."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, run in sides.items():
            times[name].append(run())
    return times


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def calibration_ids(tokenizer, tokens: int) -> torch.Tensor:
    """[1, tokens] of the built-in calibration prose (`tpa-convert --calibration prose`), never evaluated on."""
    from tpa_model.cli import calibration_text

    return torch.tensor([tokenizer.encode(calibration_text("prose"), add_bos=True)[:tokens]], dtype=torch.long)


def checkpoint_config(checkpoint: Path):
    """A TPA checkpoint's text config (its ranks per layer among it), read without its weights."""
    from tpa_model.checkpoints.safetensors_files import parse_text_config, read_config

    return parse_text_config(checkpoint, read_config(checkpoint))
