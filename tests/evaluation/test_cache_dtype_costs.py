"""The recorded costs of 8- and 4-bit caches (tpa_model.evaluation.cache_dtype_costs) are found for the real models'
configs, read from their installed GGUF files, and never for a shape or a rank that was not measured.

Whether each COSTS row carries the figures docs/QUALITY.md records is not something a test can check; the rows
and the docs come from the same runs of bench/quality_frontier.py (see docs/QUALITY.md for the commands).
"""

from __future__ import annotations

import dataclasses

import pytest

from tpa_model.cache.quantization import KVCacheDtype
from tpa_model.checkpoints.loader import open_checkpoint
from tpa_model.checkpoints.named_models import resolve_model
from tpa_model.evaluation.cache_dtype_costs import COSTS, MODELS, describe, model_name, recorded_cost

REAL = {"gemma-3-270m": "Gemma 3 270M", "smollm2": "SmolLM2-135M-Instruct"}
MEASURED = [("int8", "int8"), ("fp8_e4m3", "fp8_e4m3"), ("int8", "int4"), ("int4", "int4")]


@pytest.fixture(scope="module", params=sorted(REAL))
def real(request):
    """(the model's name in MODELS, its config as loaded from the installed GGUF)."""
    _, config, _ = open_checkpoint(resolve_model(request.param))
    return REAL[request.param], config


def test_real_models_are_recognized_by_their_shape(real):
    name, config = real
    assert model_name(config) == name


@pytest.mark.parametrize("k, v", MEASURED)
def test_a_measured_cache_dtype_has_its_row(real, k, v):
    name, config = real
    cost = recorded_cost(config, KVCacheDtype.parse(k, v))
    assert cost is not None and cost.model == name
    assert cost is COSTS[(name, k, v)]
    line = describe(config, KVCacheDtype.parse(k, v))
    assert f"measured on {name}" in line and (cost.passkey or "passkey not measured") in line
    assert "docs/QUALITY.md" in line
    assert f"{cost.perplexity_change:+.2%}" in line


def test_every_row_names_a_known_model_and_valid_figures():
    assert COSTS, "no cost recorded"
    for (model, k, v), cost in COSTS.items():
        assert model in MODELS.values() and cost.model == model
        assert KVCacheDtype.parse(k, v) == KVCacheDtype(k, v) and KVCacheDtype(k, v).quantized
        assert cost.kl >= 0 and -1 < cost.perplexity_change < 10
        assert cost.passkey is None or ("/" in cost.passkey and "(original " in cost.passkey)


def test_an_unknown_shape_is_not_measured(real):
    _, config = real
    other = dataclasses.replace(config, hidden_size=config.hidden_size + 64)
    assert model_name(other) is None
    assert recorded_cost(other, KVCacheDtype.parse("int8")) is None
    assert "not measured" in describe(other, KVCacheDtype.parse("int8"))


def test_a_reduced_rank_config_is_not_measured():
    _, config, _ = open_checkpoint(resolve_model("smollm2"))
    for reduced in (config.with_ranks(2, 2), config.with_ranks(3, 1),
                    config.with_layer_ranks([(3, 3)] * (config.num_hidden_layers - 1) + [(1, 1)])):
        assert model_name(reduced) == "SmolLM2-135M-Instruct"  # the shape is known, the ranks are not
        assert recorded_cost(reduced, KVCacheDtype.parse("int8")) is None
        assert "not measured" in describe(reduced, KVCacheDtype.parse("int8"))


def test_an_unmeasured_dtype_pair_is_not_measured(real):
    _, config = real
    assert recorded_cost(config, KVCacheDtype.parse("int4", "int8")) is None  # keys in 4 bits, values in 8
    assert "not measured" in describe(config, KVCacheDtype.parse("int4", "int8"))
