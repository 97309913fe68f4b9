"""What a TPA checkpoint records about how it was made and what it costs in quality.

A converted model differs from its original below full rank, so the checkpoint carries, next to its ranks:
the conversion method, the cache budget it was fitted to, the healing budget, and the quality harness's
figures on held-out text. `tpa-serve` logs them next to the capacity line, so a capacity figure is never
shown without its quality cost.
"""

from __future__ import annotations

from typing import Any

KEY = "provenance"  # the checkpoint's config.json entry


def record(model, section: str, **fields: Any) -> None:
    """Add (or replace) one section of the model's provenance: conversion, budget, healing, quality."""
    provenance = getattr(model, "provenance", None) or {}
    provenance[section] = fields
    model.provenance = provenance


def quality_fields(report) -> dict[str, Any]:
    """The figures of a tpa_model.evaluation.quality.QualityReport a checkpoint keeps."""
    return {
        "text": report.text_source,
        "eval_tokens": report.eval_tokens,
        "perplexity_original": report.perplexity_original,
        "perplexity": report.perplexity_candidate,
        "perplexity_change": report.perplexity_change,
        "kl": report.kl,
        "top1_agreement": report.top1_agreement,
        "greedy_agreement": report.greedy_agreement,
        "passkey_original": report.passkey_accuracy("original"),
        "passkey": report.passkey_accuracy("candidate"),
    }


def healing_fields(report) -> dict[str, Any]:
    """What a checkpoint keeps of a tpa_model.compression.heal.HealReport: the budget, the recipe, where it ended."""
    return {
        "tokens": report.tokens_seen,
        "token_budget": report.token_budget,
        "finished": report.finished,
        "train": report.train,
        "source": report.source,
        "seq_len": report.seq_len,
        "batch_size": report.batch_size,
        "lr": report.lr,
        "final_kl": report.curve[-1][1] if report.curve else None,
        "train_seconds": round(report.train_seconds, 1),
    }


def summary(provenance: dict[str, Any] | None, exact: bool, cache: str | None = None) -> str:
    """One line for the start-up log: how the model was made and its measured quality cost; `cache` says what
    a quantized KV cache costs (evaluation.cache_dtype_costs.describe), None when the cache is not quantized."""
    if exact and not provenance and cache is None:
        return "quality: exact (full rank everywhere: the original model's outputs)"
    if exact and not provenance:
        return f"quality: full rank everywhere; {cache}"
    provenance = provenance or {}
    parts = []
    conversion = provenance.get("conversion")
    if conversion:
        parts.append(f"conversion: {conversion.get('method', 'unknown')}")
    healing = provenance.get("healing")
    if healing:
        parts.append(f"healed on {healing.get('tokens', '?')} tokens")
    quality = provenance.get("quality")
    if quality:
        parts.append(
            f"perplexity {quality['perplexity_change']:+.1%} on held-out prose ({quality['text']}), "
            f"KL {quality['kl']:.3f} nats/token, top-1 agreement {quality['top1_agreement']:.1%}, "
            f"passkey {quality['passkey']:.0%} (original {quality['passkey_original']:.0%})"
        )
    else:
        parts.append("quality not measured (tpa-convert --evaluate measures it)")
    if cache is not None:
        parts.append(cache)
    return "quality: " + "; ".join(parts)
