"""TPA specifics: attention on factors, low-rank conversion, the factor cache's size."""

import pytest
import torch
from conftest import TINY_TEXT

from tpa_model import ContiguousFactorCache, Factors, factor_attention, load_model, reduce_rank
from tpa_model.attention import attention_masks, dense_attention
from tpa_model.convert import energy_rank, head_covariance


def random_factors(B, T, R_k, R_v, G, d, gen):
    def r(*shape):
        return torch.randn(*shape, generator=gen)

    return Factors(r(B, T, R_k, G), r(B, T, R_k, d), r(B, T, R_v, G), r(B, T, R_v, d))


@pytest.mark.parametrize("L", [1, 5])
def test_factor_attention_equals_dense_attention(L):
    gen = torch.Generator().manual_seed(0)
    B, H, G, d, T = 2, 8, 4, 16, 19
    kv = random_factors(B, T, 3, 2, G, d, gen)
    q = torch.randn(B, H, L, d, generator=gen)
    q_pos = torch.arange(T - L, T)
    for mask in attention_masks(q_pos, torch.arange(T), window=6):
        k, v = kv.materialize()
        expected = dense_attention(q, k, v, mask, scale=0.3)
        assert (factor_attention(q, kv, mask, scale=0.3) - expected).abs().max() <= 1e-5


def test_masks_follow_gemma_rules():
    q_pos, k_pos = torch.arange(10), torch.arange(10)
    full, sliding = attention_masks(q_pos, k_pos, window=4)
    for i in range(10):
        for j in range(10):
            assert bool(full[0, 0, i, j]) == (j <= i)
            assert bool(sliding[0, 0, i, j]) == (j <= i and i - j < 4)


@torch.no_grad()
def test_low_rank_error_is_non_increasing(hf_causal, token_ids):
    path, ref = hf_causal
    G = TINY_TEXT["num_key_value_heads"]
    calibration = token_ids[:1]
    errors, kls = [], []
    for rank in range(1, G + 1):
        model = load_model(path)
        report = reduce_rank(model, rank, rank, calibration_ids=calibration, progress=False)
        assert model.config.k_rank == rank and model.layers[3].attn.v.rank == rank
        errors.append([(r.k_error, r.v_error) for r in report.layers])
        kls.append(report.kl)
    for low, high in zip(errors, errors[1:]):
        for (k_lo, v_lo), (k_hi, v_hi) in zip(low, high):
            assert k_hi <= k_lo + 1e-6 and v_hi <= v_lo + 1e-6
    assert max(max(pair) for pair in errors[-1]) < 1e-5  # full rank is exact
    assert errors[0][0][0] > 1e-2  # rank 1 really is lossy on random weights
    assert kls[-1] < 1e-8 and kls[0] > kls[-1]


@torch.no_grad()
def test_weight_space_conversion_and_auto_rank(hf_causal, token_ids):
    path, ref = hf_causal
    model = load_model(path, k_rank="auto", v_rank=2)
    report = model.conversion_report
    assert "weight-space" in report.inputs
    assert model.config.v_rank == 2
    # auto picks the smallest rank that keeps 99% of the head-covariance energy in every layer
    covs = [head_covariance(layer.attn.k.head_weights()) for layer in load_model(path).layers]
    assert model.config.k_rank == max(energy_rank(C, 0.99) for C in covs)
    assert all(r.v_error > 0 for r in report.layers)
    assert "k_rel_err" in report.format()


@torch.no_grad()
def test_factored_queries(hf_causal, token_ids):
    path, ref = hf_causal
    H = TINY_TEXT["num_attention_heads"]
    exact = load_model(path, q_rank=H)
    assert exact.layers[0].attn.q is not None
    assert (exact(token_ids) - ref(token_ids).logits).abs().max() <= 1e-4
    low = load_model(path, q_rank=2)
    assert low.config.tpa.q_rank == 2 and low.layers[0].attn.q.rank == 2


def test_cannot_raise_rank(hf_causal, tmp_path):
    from tpa_model import CheckpointError, save_model

    path, _ = hf_causal
    save_model(load_model(path, k_rank=1, v_rank=1), tmp_path)
    assert load_model(tmp_path).config.k_rank == 1
    with pytest.raises(CheckpointError, match="cannot raise a rank from 1 to 2"):
        load_model(tmp_path, k_rank=2)


@pytest.mark.parametrize("k_rank,v_rank", [(1, 1), (2, 3), (4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_per_token_match_factor_count(k_rank, v_rank, dtype):
    from tpa_model import preset

    cfg = preset("tiny")
    cfg = cfg.with_ranks(min(k_rank, cfg.num_key_value_heads), min(v_rank, cfg.num_key_value_heads))
    G, d = cfg.num_key_value_heads, cfg.head_dim
    cache = ContiguousFactorCache(cfg, batch_size=3, max_len=50, dtype=dtype)
    elements = cfg.k_rank * (G + d) + cfg.v_rank * (G + d)
    for layer in range(cfg.num_hidden_layers):
        assert cache.bytes_per_token(layer) == elements * dtype.itemsize
