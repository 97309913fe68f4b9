"""Capacity figures come from allocated tensors and agree with the factor count."""

import torch

from tpa_model.cache import ContiguousFactorCache
from tpa_model.capacity import session_bytes, sessions_in_memory, standard_layout, tpa_layout
from tpa_model.config import GLOBAL, SLIDING, preset


def test_block_bytes_agree_with_the_contiguous_cache():
    cfg = preset("4b").with_ranks(2, 3)
    layout = tpa_layout(cfg, torch.bfloat16, block_size=16)
    per_token_layer = cfg.k_rank * (4 + 256) + cfg.v_rank * (4 + 256)
    n_global = cfg.layer_types.count(GLOBAL)
    assert layout.block_bytes[GLOBAL] == n_global * 16 * per_token_layer * 2
    assert layout.block_bytes[SLIDING] == (cfg.num_hidden_layers - n_global) * 16 * per_token_layer * 2
    small = preset("tiny").with_ranks(1, 2)
    cache = ContiguousFactorCache(small, batch_size=1, max_len=16, dtype=torch.bfloat16)
    tiny = tpa_layout(small, torch.bfloat16, block_size=16)
    assert sum(tiny.block_bytes.values()) == 16 * sum(cache.bytes_per_token(i) for i in range(6))


def test_standard_layout_and_window_freeing():
    cfg = preset("27b")
    std = standard_layout(cfg, torch.bfloat16, 16, window_freeing=False)
    assert session_bytes(std, cfg, 32_768) == 62 * 2 * 16 * 128 * 2 * 32_768  # 15.5 GiB, every layer, every token
    windowed = standard_layout(cfg, torch.bfloat16, 16)
    assert session_bytes(windowed, cfg, 32_768) < session_bytes(std, cfg, 32_768) / 5


def test_27b_at_rank_2_fits_six_times_the_window_aware_standard_cache():
    cfg, memory = preset("27b"), 40 * 2**30
    standard = sessions_in_memory(standard_layout(cfg, torch.bfloat16), cfg, memory, 32_768)
    tpa = sessions_in_memory(tpa_layout(cfg.with_ranks(2, 2), torch.bfloat16), cfg, memory, 32_768)
    assert tpa >= 6 * standard


def test_one_kv_head_cannot_win():
    cfg, memory = preset("1b"), 40 * 2**30
    standard = sessions_in_memory(standard_layout(cfg, torch.bfloat16), cfg, memory, 32_768)
    tpa = sessions_in_memory(tpa_layout(cfg.with_ranks(1, 1), torch.bfloat16), cfg, memory, 32_768)
    assert tpa <= standard
