"""Capacity figures come from allocated tensors, agree with the factor count, and with what the engine admits."""

import pytest
import torch

from server.engine.engine import EngineConfig, LLMEngine
from tpa_model.cache.backends.reference import ReferenceBackend
from tpa_model.cache.capacity import sessions_in_memory, standard_layout, tpa_layout
from tpa_model.cache.kv_cache import ContiguousKVCache, max_blocks_per_seq
from tpa_model.cache.quantization import KVCacheDtype
from tpa_model.checkpoints.demo import build_demo
from tpa_model.checkpoints.loader import load_model
from tpa_model.model.config import GLOBAL, preset
from tpa_model.sampling import SamplingParams
from tpa_model.tokenizers.gemma_tokenizer import GemmaTokenizer


def test_block_bytes_agree_with_the_contiguous_cache():
    cfg = preset("4b").with_ranks(2, 3)
    layout = tpa_layout(cfg, torch.bfloat16, block_size=16)
    per_token_layer = cfg.k_rank * (4 + 256) + cfg.v_rank * (4 + 256)
    n_global = cfg.layer_types.count(GLOBAL)
    assert layout.block_bytes["global"] == n_global * 16 * per_token_layer * 2
    assert layout.block_bytes["sliding"] == (cfg.num_hidden_layers - n_global) * 16 * per_token_layer * 2
    small = preset("tiny").with_ranks(1, 2)
    cache = ContiguousKVCache(small, batch_size=1, max_len=16, dtype=torch.bfloat16, backend=ReferenceBackend())
    tiny = tpa_layout(small, torch.bfloat16, block_size=16)
    assert sum(tiny.block_bytes.values()) == cache.kv.total_bytes()


def test_exact_rank_is_stored_like_a_standard_cache():
    cfg = preset("4b")
    exact, standard = tpa_layout(cfg, torch.bfloat16), standard_layout(cfg, torch.bfloat16)
    assert exact.block_bytes == standard.block_bytes
    assert exact.session_bytes(32_768) == standard.session_bytes(32_768)


def test_standard_layout_and_window_freeing():
    cfg = preset("27b")
    std = standard_layout(cfg, torch.bfloat16, 16, window_freeing=False)
    assert std.session_bytes(32_768) == 62 * 2 * 16 * 128 * 2 * 32_768  # 15.5 GiB, every layer, every token
    windowed = standard_layout(cfg, torch.bfloat16, 16)
    assert windowed.session_bytes(32_768) < std.session_bytes(32_768) / 5


def test_27b_at_rank_2_fits_six_times_the_window_aware_standard_cache():
    cfg, memory = preset("27b"), 40 * 2**30
    standard = sessions_in_memory(standard_layout(cfg, torch.bfloat16), memory, 32_768)
    tpa = sessions_in_memory(tpa_layout(cfg.with_ranks(2, 2), torch.bfloat16), memory, 32_768)
    assert tpa >= 6 * standard


def test_one_kv_head_cannot_win():
    cfg, memory = preset("1b"), 40 * 2**30
    standard = sessions_in_memory(standard_layout(cfg, torch.bfloat16), memory, 32_768)
    tpa = sessions_in_memory(tpa_layout(cfg.with_ranks(1, 1), torch.bfloat16), memory, 32_768)
    assert tpa <= standard


def test_max_blocks_per_seq_is_what_a_window_holds():
    # a window of 16 tokens in blocks of 4: a decode step sees 16 tokens, which touch at most 5 blocks
    assert max_blocks_per_seq(1000, 4, 16) == 5
    assert max_blocks_per_seq(1000, 4, None) == 250
    assert max_blocks_per_seq(10, 4, 16) == 3  # never more than the sequence's own blocks
    assert max_blocks_per_seq(1000, 4, 16, chunk=8) == 7  # 23 tokens from the window's start to the chunk's end


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("capacity_model")
    build_demo(path)
    return path


@pytest.mark.parametrize("cache_dtype", ["auto", "int8", "int8/int4"])
@pytest.mark.parametrize("ranks", [(None, None), (1, 1)], ids=["standard", "factors"])
def test_the_capacity_line_is_what_the_engine_admits(demo_dir, ranks, cache_dtype):
    """Fill the cache with sessions that grow to max_model_len in lockstep and count how many reach it together;
    a quantized cache's scales are counted as its data."""
    model = load_model(demo_dir, k_rank=ranks[0], v_rank=ranks[1])
    L, prompt_len = 64, 8
    k, _, v = cache_dtype.partition("/")
    layout = tpa_layout(model.config, model.dtype, 4, KVCacheDtype.parse(k, v or None))
    memory = int(6.5 * layout.session_bytes(L)) + 8 * sum(layout.block_bytes.values())
    engine = LLMEngine(model, GemmaTokenizer.from_dir(demo_dir), EngineConfig(
        block_size=4, max_model_len=L, cache_memory_gib=memory / 2**30, max_num_batched_tokens=128,
        kv_cache_dtype=k, v_cache_dtype=v or None))
    assert engine.runner.kv.total_bytes() <= memory
    sessions = engine.capacity.sessions
    assert sessions == 6 and engine.capacity.engine_limit == 6
    assert f"it holds {sessions} sessions of {L} tokens at once" in engine.capacity.format()
    params = SamplingParams(max_tokens=L - prompt_len, temperature=0.0, ignore_eos=True)
    for i in range(sessions + 3):
        engine.add_request(f"r{i}", [2] + [10 + i] * (prompt_len - 1), params)
    together = 0
    while engine.has_unfinished():
        engine.step()
        together = max(together, sum(s.num_computed >= L - 2 for s in engine.scheduler.running))
    assert together == sessions
    assert all(used == 0 for used, _ in engine.block_usage().values())
