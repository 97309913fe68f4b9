"""Low-rank conversion: choose a head basis U per layer and re-express K, V (and optionally Q) on it.

For the per-head projections W_g (d x D), the head covariance C[g, g'] = tr(W_g S W_g'^T) measures how
heads co-vary; its top-R eigenvectors U span the best rank-R subspace across heads. S = I gives the
weight-space basis (no data); S = E[x x^T] over calibration inputs gives the activation-aware one. The new
token projections are W_b^r = sum_g U[g, r] W_g, and K[g] = sum_r U[g, r] b_r reconstructs the projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..checkpoints.provenance import record
from ..model.attention import FactorProjection, TPAttention, combine
from ..model.decoder import GemmaTPAModel

DEFAULT_ENERGY = 0.99
FITS = ("activations", "attention")
RankSpec = int | str | list[int] | None  # an int, one per layer, "auto" (energy threshold), or None (as is)


@dataclass
class LayerReport:
    layer: int
    k_rank: int
    v_rank: int
    k_energy: float  # fraction of the head-covariance spectrum the basis keeps
    v_energy: float
    k_error: float  # relative Frobenius error of the normed keys on the evaluation inputs
    v_error: float


@dataclass
class ConversionReport:
    inputs: str
    layers: list[LayerReport] = field(default_factory=list)
    kl: float | None = None  # mean KL(original || converted) of next-token distributions, per token
    q_rank: int | None = None

    def format(self) -> str:
        lines = [
            f"errors measured on: {self.inputs}",
            f"{'layer':>5} {'k_rank':>6} {'v_rank':>6} {'k_energy':>9} {'v_energy':>9} "
            f"{'k_rel_err':>10} {'v_rel_err':>10}",
        ]
        for r in self.layers:
            lines.append(
                f"{r.layer:>5} {r.k_rank:>6} {r.v_rank:>6} {r.k_energy:>9.5f} {r.v_energy:>9.5f} "
                f"{r.k_error:>10.3e} {r.v_error:>10.3e}"
            )
        if self.layers:
            k_mean = sum(r.k_error for r in self.layers) / len(self.layers)
            v_mean = sum(r.v_error for r in self.layers) / len(self.layers)
            lines.append(f"{'mean':>5} {'':>6} {'':>6} {'':>9} {'':>9} {k_mean:>10.3e} {v_mean:>10.3e}")
        kl = "n/a (needs calibration text)" if self.kl is None else f"{self.kl:.6f} nats/token"
        lines.append(f"next-token KL(original || converted): {kl}")
        return "\n".join(lines)


def head_covariance(W: torch.Tensor, X: torch.Tensor | None = None, M: torch.Tensor | None = None) -> torch.Tensor:
    """C[g, g'] = tr(W_g S W_g'^T M) for W [G, d, D]; S = I without inputs, else X^T X / N for X [N, D]; M [d, d]
    weighs the head_dim directions by what reads them (identity when None)."""
    W = W.double()
    if X is None:
        return torch.einsum("gdh,kdh->gk", W, W)
    Y = torch.einsum("nh,gdh->ngd", X.double(), W)
    if M is None:
        return torch.einsum("ngd,nkd->gk", Y, Y) / X.shape[0]
    return torch.einsum("ngd,de,nke->gk", Y, M.double(), Y) / X.shape[0]


def key_metric(attn: TPAttention, x: torch.Tensor) -> torch.Tensor:
    """E[q q^T] [d, d] over the tokens and query heads, for keys before their norm: an error dk in a key moves a
    score by q . dk, so the basis should keep the key directions the queries actually read ("the keys as the
    queries see them"). Before RoPE: RoPE turns q and k by the same angles at equal positions. A k-norm's
    weight scales each direction of the stored key, so it is folded in."""
    q = attn.queries(x, rope=None).reshape(-1, attn.head_dim).double()
    M = q.t() @ q / q.shape[0]
    if attn.k.norm_weight is not None:
        s = 1.0 + attn.k.norm_weight.double()
        M = s[:, None] * M * s[None, :]
    return M


def value_metric(attn: TPAttention) -> torch.Tensor:
    """sum_h W_o,h^T W_o,h / H [d, d]: an error dv in a value reaches the layer's output through o_proj, so the
    basis should keep the value directions the output projection does not discard."""
    Wo = attn.o_proj.weight.double().unflatten(1, (attn.n_heads, attn.head_dim))  # [D, H, d]
    return torch.einsum("xhd,xhe->de", Wo, Wo) / attn.n_heads


def spectrum(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a symmetric PSD matrix."""
    evals, evecs = torch.linalg.eigh(C)
    return evals.flip(0).clamp_min(0), evecs.flip(1)


def energy_rank(C: torch.Tensor, threshold: float) -> int:
    """Smallest R whose top-R eigenvalues hold at least `threshold` of the total."""
    evals, _ = spectrum(C)
    kept = evals.cumsum(0) / evals.sum().clamp_min(1e-30)
    return int((kept < threshold - 1e-12).sum().item()) + 1


def head_basis(C: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """(U [G, rank] with orthonormal columns, energy kept). Full rank uses U = I: exact, no rotation."""
    G = C.shape[0]
    if rank >= G:
        return torch.eye(G, dtype=torch.float64), 1.0
    evals, evecs = spectrum(C)
    return evecs[:, :rank], float(evals[:rank].sum() / evals.sum().clamp_min(1e-30))


def refactor(proj: FactorProjection, U: torch.Tensor) -> None:
    """Re-express proj's heads on the basis U: W_b^r = sum_g U[g, r] W_g."""
    W = proj.head_weights().double()
    W_b = torch.einsum("gr,gdh->rdh", U, W)
    dtype, device = proj.token_proj.weight.dtype, proj.token_proj.weight.device
    rank = U.shape[1]
    proj.rank = rank
    proj.token_proj = nn.Linear(W.shape[-1], rank * proj.head_dim, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        proj.token_proj.weight.copy_(W_b.reshape(rank * proj.head_dim, -1))
    proj.head_basis = nn.Parameter(U.to(device=device, dtype=dtype))


def dense_queries_to_factors(attn: TPAttention) -> FactorProjection:
    """Full-rank query factors equal to attn's dense q_proj + q_norm, ready to be refactored."""
    norm = attn.q_norm is not None
    q = FactorProjection(
        attn.q_proj.in_features, attn.n_heads, attn.head_dim, attn.n_heads, norm, attn.q_norm.eps if norm else 1e-6
    ).to(device=attn.q_proj.weight.device, dtype=attn.q_proj.weight.dtype)
    with torch.no_grad():
        q.token_proj.weight.copy_(attn.q_proj.weight)
        if norm:
            q.norm_weight.copy_(attn.q_norm.weight)
    return q


def _relative_error(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((after.double() - before.double()).norm() / before.double().norm().clamp_min(1e-30))


def _heads(proj: FactorProjection, X: torch.Tensor) -> torch.Tensor:
    return combine(*proj(X.to(proj.token_proj.weight.dtype)))


@torch.no_grad()
def attention_inputs(model: GemmaTPAModel, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The normed hidden states every attention layer sees on the given tokens, and the logits."""
    captured: list[torch.Tensor] = []
    hooks = [
        layer.attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
        for layer in model.layers
    ]
    try:
        logits = model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return [x.float() for x in captured], logits.float()


def _resolve(spec: RankSpec, covariances: list[torch.Tensor], energy: float, current: list[int]) -> list[int]:
    """The rank of every layer for one projection."""
    if spec is None:
        return list(current)
    if spec == "auto":
        ranks = [max(energy_rank(C, energy) for C in covariances)] * len(current)
    elif isinstance(spec, (list, tuple)):
        if len(spec) != len(current):
            raise ValueError(f"{len(spec)} ranks given for {len(current)} layers")
        ranks = [int(r) for r in spec]
    else:
        ranks = [int(spec)] * len(current)
    for rank, have in zip(ranks, current):
        if rank > have:
            raise ValueError(f"cannot raise a rank from {have} to {rank}: the checkpoint stores rank {have}")
        if rank < 1:
            raise ValueError(f"ranks must be at least 1, got {rank}")
    return ranks


@torch.no_grad()
def reduce_rank(
    model: GemmaTPAModel,
    k_rank: RankSpec = None,
    v_rank: RankSpec = None,
    q_rank: RankSpec = None,
    calibration_ids: torch.Tensor | None = None,
    energy: float = DEFAULT_ENERGY,
    num_eval_tokens: int = 256,
    progress: bool = True,
    fit: str = "activations",
) -> ConversionReport:
    """Convert the model in place to the requested ranks and report the error it costs.

    Without calibration tokens the basis is weight-space (S = I) and errors are measured on isotropic
    Gaussian inputs (the inputs S = I assumes); with them, both use the real attention inputs. fit="attention"
    (calibration needed) also weighs each key direction by the queries (`key_metric`) and each value direction
    by the output projection (`value_metric`), so the basis keeps what attention reads rather than what is large.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if fit == "attention" and calibration_ids is None:
        raise ValueError("an attention-aware fit measures the queries on text: give calibration tokens")
    cfg = model.config
    device = model.device
    if calibration_ids is not None:
        inputs, logits_before = attention_inputs(model, calibration_ids.to(device))
        report = ConversionReport(f"calibration text ({inputs[0].shape[0]} tokens, activation-aware basis)")
    else:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(num_eval_tokens, cfg.hidden_size, generator=gen).to(device)
        inputs, logits_before = [x] * cfg.num_hidden_layers, None
        report = ConversionReport(f"{num_eval_tokens} isotropic Gaussian inputs (weight-space basis)")
    use_x = calibration_ids is not None

    attns = [layer.attn for layer in model.layers]
    if q_rank is not None:
        for attn in attns:
            if attn.q is None:
                attn.q = dense_queries_to_factors(attn)
                del attn.q_proj, attn.q_norm
    layers = range(cfg.num_hidden_layers)
    plans = [("k", k_rank, [cfg.layer_ranks(i)[0] for i in layers]),
             ("v", v_rank, [cfg.layer_ranks(i)[1] for i in layers])]
    if q_rank is not None:
        plans.append(("q", q_rank, [cfg.tpa.q_rank or cfg.num_attention_heads] * cfg.num_hidden_layers))
    metrics = {name: [None] * len(attns) for name, _, _ in plans}
    if fit == "attention":
        metrics["k"] = [key_metric(a, x.to(a.o_proj.weight.dtype)) for a, x in zip(attns, inputs)]
        metrics["v"] = [value_metric(a) for a in attns]
    covs = {
        name: [head_covariance(getattr(a, name).head_weights(), x if use_x else None, m)
               for a, x, m in zip(attns, inputs, metrics[name])]
        for name, _, _ in plans
    }
    ranks = {name: _resolve(spec, covs[name], energy, current) for name, spec, current in plans}

    for i, (attn, x) in enumerate(tqdm(list(zip(attns, inputs)), desc="factorizing layers", disable=not progress)):
        stats = {}
        for name, _, _ in plans:
            proj = getattr(attn, name)
            before = _heads(proj, x)
            U, kept = head_basis(covs[name][i], ranks[name][i])
            if U.shape[1] != proj.rank:
                refactor(proj, U)
            stats[name] = (kept, _relative_error(before, _heads(proj, x)))
        report.layers.append(LayerReport(
            i, ranks["k"][i], ranks["v"][i], stats["k"][0], stats["v"][0], stats["k"][1], stats["v"][1]))
    q = ranks["q"][0] if "q" in ranks else cfg.tpa.q_rank
    model.config = cfg.with_layer_ranks(list(zip(ranks["k"], ranks["v"])), q)
    report.q_rank = model.config.tpa.q_rank
    if logits_before is not None:
        logits_after = model(calibration_ids.to(device)).float()
        report.kl = kl_divergence(logits_before, logits_after)
    if any(ranks[name] != current for name, _, current in plans):
        basis = {"activations": "activation-aware", "attention": "attention-aware"}[fit] if use_x else "weight-space"
        record(model, "conversion", method=f"head basis per layer, {basis}", calibration=report.inputs,
               kl_calibration=report.kl)
    return report


def to_per_token_svd(model: GemmaTPAModel, k_rank: int | list[int], v_rank: int | list[int]) -> None:
    """Cache each token's keys and values as the best rank-R fit of its own G x d matrix (an SVD when the
    token is written), instead of projecting on one head basis per layer. The weights stay exact."""
    cfg = model.config
    L, G = cfg.num_hidden_layers, cfg.num_key_value_heads
    ks = k_rank if isinstance(k_rank, list) else [k_rank] * L
    vs = v_rank if isinstance(v_rank, list) else [v_rank] * L
    if any(proj.rank < G for layer in model.layers for proj in (layer.attn.k, layer.attn.v)):
        raise ValueError("per-token SVD factors an exact checkpoint (full rank everywhere)")
    for layer, k, v in zip(model.layers, ks, vs):
        layer.attn.k.svd_rank = k if k < G else None
        layer.attn.v.svd_rank = v if v < G else None
    model.config = cfg.with_layer_ranks(list(zip(ks, vs)), cfg.tpa.q_rank)
    model.config.tpa.factorization = "svd"
    record(model, "conversion", method="per-token SVD factors")


def make_heads_contextual(model: GemmaTPAModel) -> None:
    """Give every layer's key and value head factors a learned token-dependent part (T6's form), at zero:
    the model is unchanged until healing trains it."""
    for layer in model.layers:
        for proj in (layer.attn.k, layer.attn.v):
            if proj.head_proj is None:
                proj.make_contextual()
    model.config.tpa.contextual_heads = True


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """Mean over tokens of KL(softmax(p) || softmax(q)), in nats."""
    logp = F.log_softmax(logits_p.reshape(-1, logits_p.shape[-1]).double(), -1)
    logq = F.log_softmax(logits_q.reshape(-1, logits_q.shape[-1]).double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    return float(kl) if math.isfinite(float(kl)) else float("inf")
