"""Ranks per layer under a cache budget, chosen from each layer's measured sensitivity.

Lowering one layer's key (or value) rank by one costs some next-token KL and saves some cache bytes per
token. We measure the KL of every single reduction on calibration text (one layer, one part, one rank; the
rest of the model exact, with the activation-aware head basis), then lower ranks greedily, the smallest KL
per byte saved first, until the layers fit the budget. Layers whose cache grows with the context (global
layers) and sliding-window layers (which hold one window whatever the context) get separate budgets: at long
context almost all of a Gemma 3 cache is in its global layers.

A part at full rank is stored plain (G x d numbers per token); below, as factors (R (G + d) numbers).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..cache.backends import default_backend
from ..cache.kv_cache import ContiguousKVCache
from ..model.decoder import GemmaTPAModel
from .convert import attention_inputs, head_basis, head_covariance, kl_divergence, refactor

PARTS = ("k", "v")


def part_numbers(kv_heads: int, head_dim: int, rank: int) -> int:
    """Numbers per token one part of one layer stores at this rank (plain at full rank)."""
    return kv_heads * head_dim if rank >= kv_heads else rank * (kv_heads + head_dim)


@dataclass
class Sensitivity:
    """KL(original || model with one part of one layer at a lower rank), per (layer, part, rank)."""

    kl: dict[tuple[int, str, int], float]
    tokens: int

    def cost(self, layer: int, part: str, rank: int, kv_heads: int) -> float:
        return 0.0 if rank >= kv_heads else self.kl[(layer, part, rank)]


@torch.no_grad()
def measure_sensitivity(
    model: GemmaTPAModel, calibration_ids: torch.Tensor, layers: list[int] | None = None, progress: bool = True
) -> Sensitivity:
    """Reduce one part of one layer at a time (activation-aware basis) and measure the next-token KL."""
    cfg = model.config
    ids = calibration_ids.to(model.device)
    inputs, reference = attention_inputs(model, ids)
    residual = layer_inputs(model, ids)
    layers = list(range(cfg.num_hidden_layers)) if layers is None else layers
    jobs = [(i, p, r) for i in layers for p in PARTS for r in range(1, _rank(cfg, i, p))]
    kl = {}
    for i, part, rank in tqdm(jobs, desc="layer sensitivity", disable=not progress):
        kl[(i, part, rank)] = _kl_with_one_reduction(model, ids, reference, inputs[i], residual[i], i, part, rank)
    return Sensitivity(kl, ids.numel())


def layer_inputs(model: GemmaTPAModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering every decoder layer, [N, D] each."""
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0])) for layer in model.layers]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return captured


def _rank(cfg, layer: int, part: str) -> int:
    return cfg.layer_ranks(layer)[PARTS.index(part)]


def _kl_with_one_reduction(model, ids, reference, attn_inputs, residual, layer: int, part: str, rank: int) -> float:
    """Convert one projection, run the layers from it on, and put everything back as it was."""
    attn, config = model.layers[layer].attn, model.config
    original = getattr(attn, part)
    reduced = copy.deepcopy(original)
    refactor(reduced, head_basis(head_covariance(reduced.head_weights(), attn_inputs), rank)[0])
    ranks = [config.layer_ranks(i) for i in range(config.num_hidden_layers)]
    ranks[layer] = (rank, ranks[layer][1]) if part == "k" else (ranks[layer][0], rank)
    setattr(attn, part, reduced)
    model.config = config.with_layer_ranks(ranks, config.tpa.q_rank)
    try:
        B, L = ids.shape
        cache = ContiguousKVCache(model.config, B, L, model.dtype, model.device, backend=default_backend(model.device),
                                  cache_dtype=model.kv_cache_dtype)
        meta = cache.step(L)
        hidden = model.decode_layers(residual, meta.positions, meta, start=layer)
        return kl_divergence(reference, model.logits(hidden).view(B, L, -1).float())
    finally:
        setattr(attn, part, original)
        model.config = config


def allocate(
    sensitivity: Sensitivity, kv_heads: int, head_dim: int, layers: list[int], budget: float
) -> dict[int, tuple[int, int]]:
    """(k_rank, v_rank) per layer: the greedy path, cheapest KL per byte saved first, until the layers store
    at most `budget` of a standard cache's numbers per token (or every part is at rank 1)."""
    ranks = {(i, p): kv_heads for i in layers for p in PARTS}
    target = budget * len(layers) * 2 * kv_heads * head_dim
    total = sum(part_numbers(kv_heads, head_dim, r) for r in ranks.values())
    while total > target:
        step = _cheapest_step(sensitivity, ranks, kv_heads, head_dim)
        if step is None:
            break
        key, saving = step
        ranks[key] -= 1
        total -= saving
    return {i: (ranks[(i, "k")], ranks[(i, "v")]) for i in layers}


def _cheapest_step(sensitivity, ranks, kv_heads, head_dim):
    """((layer, part), numbers saved) of the one-rank reduction with the least KL per number saved."""
    best = None
    for (layer, part), rank in ranks.items():
        saving = part_numbers(kv_heads, head_dim, rank) - part_numbers(kv_heads, head_dim, rank - 1)
        if rank == 1 or saving <= 0:
            continue
        extra = sensitivity.cost(layer, part, rank - 1, kv_heads) - sensitivity.cost(layer, part, rank, kv_heads)
        if best is None or extra / saving < best[0]:
            best = (extra / saving, (layer, part), saving)
    return None if best is None else best[1:]


def choose_layer_ranks(
    model: GemmaTPAModel,
    calibration_ids: torch.Tensor,
    budget: float,
    sliding_budget: float = 1.0,
    progress: bool = True,
) -> list[tuple[int, int]]:
    """Ranks for every layer: global layers within `budget`, sliding-window layers within `sliding_budget`
    (1.0 keeps them exact), each as a fraction of a standard cache's bytes per token for those layers."""
    cfg = model.config
    groups = [(budget, [i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i)]),
              (sliding_budget, [i for i in range(cfg.num_hidden_layers) if cfg.is_sliding(i)])]
    measured = [i for b, layers in groups if b < 1.0 for i in layers]
    if any(cfg.layer_ranks(i) != (cfg.num_key_value_heads,) * 2 for i in measured):
        raise ValueError("ranks under a cache budget are chosen from an exact checkpoint (full rank everywhere)")
    sensitivity = measure_sensitivity(model, calibration_ids, measured, progress)
    ranks = {i: cfg.layer_ranks(i) for i in range(cfg.num_hidden_layers)}
    for fraction, layers in groups:
        if fraction < 1.0 and layers:
            ranks |= allocate(sensitivity, cfg.num_key_value_heads, cfg.head_dim, layers, fraction)
    return [ranks[i] for i in range(cfg.num_hidden_layers)]


def cache_fraction(config, layers: list[int] | None = None) -> float:
    """Numbers per token the layers store at their ranks, as a fraction of a standard cache's."""
    G, d = config.num_key_value_heads, config.head_dim
    layers = list(range(config.num_hidden_layers)) if layers is None else layers
    stored = sum(part_numbers(G, d, r) for i in layers for r in config.layer_ranks(i))
    return stored / (len(layers) * 2 * G * d)
