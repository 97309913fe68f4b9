"""Ranks per layer under a cache budget: the greedy path, the budgets per layer kind, the checkpoint round trip."""

import torch
from conftest import TINY_TEXT

from tpa_model import load_model, save_model
from tpa_model.compression.convert import reduce_rank
from tpa_model.compression.rank_allocation import (
    Sensitivity,
    allocate,
    cache_fraction,
    choose_layer_ranks,
    part_numbers,
)
from tpa_model.model.config import preset

G, D = 4, 16


def test_the_cheapest_reductions_go_first():
    """Layer 0's keys are costly to reduce, layer 1's cheap: layer 1 goes down first, layer 0 last."""
    kl = {}
    for rank in range(1, G):
        for layer, part, scale in [(0, "k", 10.0), (0, "v", 1.0), (1, "k", 0.01), (1, "v", 1.0)]:
            kl[(layer, part, rank)] = scale * (G - rank)
    ranks = allocate(Sensitivity(kl, 100), G, D, [0, 1], budget=0.8)
    assert ranks[0][0] == G and ranks[1][0] < G
    stored = sum(part_numbers(G, D, r) for pair in ranks.values() for r in pair)
    assert stored <= 0.8 * 2 * 2 * G * D
    floor = allocate(Sensitivity(kl, 100), G, D, [0, 1], budget=0.0)  # unreachable: everything at rank 1
    assert floor == {0: (1, 1), 1: (1, 1)}


def test_global_and_sliding_layers_have_their_own_budgets(hf_causal, token_ids):
    path, _ = hf_causal
    model = load_model(path)
    ranks = choose_layer_ranks(model, token_ids[:1], budget=0.6, sliding_budget=1.0, progress=False)
    global_layers = [i for i in range(TINY_TEXT["num_hidden_layers"]) if not model.config.is_sliding(i)]
    assert all(ranks[i] == (G, G) for i in range(len(ranks)) if i not in global_layers)
    reduce_rank(model, [k for k, _ in ranks], [v for _, v in ranks], calibration_ids=token_ids[:1], progress=False)
    assert cache_fraction(model.config, global_layers) <= 0.6
    both = choose_layer_ranks(load_model(path), token_ids[:1], budget=0.6, sliding_budget=0.5, progress=False)
    sliding = [i for i in range(len(both)) if i not in global_layers]
    assert sum(part_numbers(G, D, r) for i in sliding for r in both[i]) <= 0.5 * len(sliding) * 2 * G * D


@torch.no_grad()
def test_layer_ranks_survive_a_checkpoint_and_the_cache_follows_them(hf_causal, token_ids, tmp_path):
    path, _ = hf_causal
    model = load_model(path)
    ranks = [(1, 2), (4, 4), (2, 1), (3, 3), (1, 1), (2, 2), (4, 1)]
    reduce_rank(model, [k for k, _ in ranks], [v for _, v in ranks], progress=False)
    assert [model.config.layer_ranks(i) for i in range(7)] == ranks
    save_model(model, tmp_path)
    reloaded = load_model(tmp_path)
    assert [reloaded.config.layer_ranks(i) for i in range(7)] == ranks
    assert (reloaded(token_ids) - model(token_ids)).abs().max().item() == 0
    from tpa_model.cache.kv_cache import layer_cache_specs

    specs = layer_cache_specs(reloaded.config, torch.float32)
    assert [(s.k_rank, s.v_rank) for s in specs] == ranks and specs[1].layout == "standard"


def test_cache_fraction_counts_plain_parts_at_full_rank():
    cfg = preset("tiny")  # 2 kv heads of 16
    assert cache_fraction(cfg) == 1.0
    assert cache_fraction(cfg.with_ranks(1, 1)) == (2 + 16) / (2 * 16)


@torch.no_grad()
def test_sensitivity_reruns_only_later_layers_and_equals_a_full_forward(hf_causal, token_ids):
    """The KL of one reduction measured from the changed layer on equals converting that layer for real."""
    from tpa_model.compression.convert import kl_divergence
    from tpa_model.compression.rank_allocation import measure_sensitivity

    path, _ = hf_causal
    ids = token_ids[:1]
    sensitivity = measure_sensitivity(load_model(path), ids, layers=[3], progress=False)
    exact = load_model(path)(ids)
    for part, rank in [("k", 1), ("v", 2)]:
        model = load_model(path)
        ranks = [G] * 7
        ranks[3] = rank
        full = [G] * 7
        reduce_rank(model, ranks if part == "k" else full, ranks if part == "v" else full, calibration_ids=ids,
                    progress=False)
        assert abs(sensitivity.kl[(3, part, rank)] - kl_divergence(exact, model(ids))) < 1e-6
