"""TPA specifics: low-rank conversion, and what each layer's cache stores per token."""

import pytest
import torch
from conftest import TINY_TEXT

from tpa_model import ContiguousKVCache, load_model, reduce_rank, save_model
from tpa_model.cache.backends.reference import ReferenceBackend
from tpa_model.compression.convert import attention_inputs, energy_rank, head_covariance, key_metric, value_metric


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
def test_attention_fit_keeps_what_attention_reads(hf_causal, token_ids):
    """fit="attention" chooses, per layer, the basis with the least key error as the queries weigh it and the
    least value error as the output projection weighs it: on the same calibration inputs its weighted errors
    are never above the plain activation-aware basis's, and below it somewhere."""
    path, _ = hf_causal
    calibration = token_ids[:1]
    original = load_model(path)
    inputs, _ = attention_inputs(original, calibration)

    def weighted_errors(fit: str) -> list[tuple[float, float]]:
        model = load_model(path)
        reduce_rank(model, 1, 1, calibration_ids=calibration, fit=fit, progress=False)
        errors = []
        for a, b, x in zip(original.layers, model.layers, inputs):
            M_k, M_v = key_metric(a.attn, x), value_metric(a.attn)
            dk = (b.attn.k.head_weights() - a.attn.k.head_weights()).double()  # [G, d, D]
            dv = (b.attn.v.head_weights() - a.attn.v.head_weights()).double()
            ek = torch.einsum("nh,gdh->ngd", x.double(), dk)
            ev = torch.einsum("nh,gdh->ngd", x.double(), dv)
            errors.append((float(torch.einsum("ngd,de,nge->", ek, M_k, ek)),
                           float(torch.einsum("ngd,de,nge->", ev, M_v, ev))))
        return errors

    plain, aware = weighted_errors("activations"), weighted_errors("attention")
    for (k_plain, v_plain), (k_aware, v_aware) in zip(plain, aware):
        assert k_aware <= k_plain * (1 + 1e-9) and v_aware <= v_plain * (1 + 1e-9)
    assert sum(k for k, _ in aware) < (1 - 1e-4) * sum(k for k, _ in plain)
    assert sum(v for _, v in aware) < (1 - 1e-4) * sum(v for _, v in plain)
    with pytest.raises(ValueError, match="calibration"):
        reduce_rank(load_model(path), 1, 1, fit="attention", progress=False)


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


@pytest.mark.parametrize("k_rank,v_rank", [(1, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_per_token_match_the_layout(k_rank, v_rank, dtype):
    """Below full rank a part stores R (G + d) numbers per token; at full rank the plain G d, never more."""
    from tpa_model import preset

    cfg = preset("tiny").with_ranks(k_rank, v_rank)
    G, d = cfg.num_key_value_heads, cfg.head_dim

    def numbers(rank):
        return rank * (G + d) if rank < G else G * d

    cache = ContiguousKVCache(cfg, batch_size=3, max_len=50, dtype=dtype, backend=ReferenceBackend())
    for layer in cache.kv.layers:
        assert layer.nbytes == 3 * 50 * (numbers(k_rank) + numbers(v_rank)) * dtype.itemsize
    assert numbers(G) < G * (G + d)  # exact layers are stored plain: factors would cost more


@torch.no_grad()
def test_contextual_head_factors_start_at_the_conversion_and_survive_a_checkpoint(hf_causal, token_ids, tmp_path):
    """T6's form: head factors U + W_a x with W_a = 0 change nothing; trained, they reach the cache and the
    engine decodes them like generate(); a checkpoint keeps them."""
    from tpa_model.compression.convert import make_heads_contextual
    from tpa_model.generation import generate

    path, _ = hf_causal
    model = load_model(path, k_rank=2, v_rank=1)
    before = model(token_ids)
    make_heads_contextual(model)
    assert (model(token_ids) - before).abs().max().item() == 0
    gen = torch.Generator().manual_seed(0)
    for layer in model.layers:
        for proj in (layer.attn.k, layer.attn.v):
            proj.head_proj.weight.copy_(torch.randn(proj.head_proj.weight.shape, generator=gen) * 0.05)
    after = model(token_ids)
    assert (after - before).abs().max().item() > 1e-3
    save_model(model, tmp_path)
    reloaded = load_model(tmp_path)
    assert reloaded.config.tpa.contextual_heads and (reloaded(token_ids) - after).abs().max().item() == 0
    prompt = token_ids[0, :12].tolist()
    full = reloaded(torch.tensor([prompt + generate(reloaded, [prompt], 8)[0][:-1]]))
    steps = generate(reloaded, [prompt], 8)[0]
    assert steps == full[0, len(prompt) - 1 :].argmax(-1).tolist()


@torch.no_grad()
def test_per_token_svd_factors_are_the_best_fit_of_each_token(hf_causal, token_ids, tmp_path):
    """Each token's cached keys are the rank-R truncation of its own G x d matrix: never further from the
    exact keys than a head basis shared by all tokens; checkpoints and the engine path keep it."""
    from tpa_model.compression.convert import to_per_token_svd
    from tpa_model.generation import generate
    from tpa_model.model.attention import combine

    path, _ = hf_causal
    x = torch.randn(40, TINY_TEXT["hidden_size"], generator=torch.Generator().manual_seed(0))
    exact = load_model(path).layers[2].attn.k
    keys = combine(*exact(x))
    svd_model, basis_model = load_model(path), load_model(path, k_rank=2, v_rank=2)
    to_per_token_svd(svd_model, 2, 2)
    svd_keys = combine(*svd_model.layers[2].attn.k(x))
    basis_keys = combine(*basis_model.layers[2].attn.k(x))
    assert (svd_keys - keys).norm() <= (basis_keys - keys).norm() + 1e-6
    best = torch.linalg.svd(keys)
    truncation = best.U[..., :2] @ torch.diag_embed(best.S[..., :2]) @ best.Vh[..., :2, :]
    assert (svd_keys - truncation).abs().max().item() < 1e-4
    assert svd_model.config.tpa.factorization == "svd" and svd_model.config.k_rank == 2
    save_model(svd_model, tmp_path)
    reloaded = load_model(tmp_path)
    assert (reloaded(token_ids) - svd_model(token_ids)).abs().max().item() < 1e-5
    prompt = token_ids[0, :12].tolist()
    steps = generate(reloaded, [prompt], 8)[0]
    full = reloaded(torch.tensor([prompt + steps[:-1]]))
    assert steps == full[0, len(prompt) - 1 :].argmax(-1).tolist()
