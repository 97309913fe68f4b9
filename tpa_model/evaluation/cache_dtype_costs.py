"""What storing the KV cache in 8 or 4 bits cost on the real models, as measured (docs/QUALITY.md), so the
start-up quality line can give a recorded figure next to the chosen cache dtype, never a guess.

Each row was measured with tpa-eval on held-out prose, against the same model with its cache in float32:
    tpa-eval --model NAME --kv-cache-dtype K --v-cache-dtype V --eval-tokens 4096 ...
(the exact commands and the machine are in docs/QUALITY.md). A model is recognized by its shape, the fields
of its config that differ between the models measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cache.quantization import KVCacheDtype


@dataclass(frozen=True)
class CacheDtypeCost:
    model: str
    perplexity_change: float  # candidate / original - 1 on held-out prose
    kl: float  # mean next-token KL(original || candidate), nats per token
    passkey: str | None  # "correct/trials" at the longest length measured, candidate (original); None: not measured


# (architecture, hidden size, layers, kv heads, head dim) of each measured model
MODELS = {
    ("gemma3", 640, 18, 1, 256): "Gemma 3 270M",
    ("llama", 576, 30, 3, 64): "SmolLM2-135M-Instruct",
}

# (model, keys' dtype, values' dtype) -> the measured cost, at full rank. Measured by bench/quality_frontier.py
# --cache-dtypes (docs/QUALITY.md, "Cache dtypes"): 4,088 tokens of evaluation prose, 2-core x86_64 CPU container,
# float32 model. Passkey at the longest length measured: SmolLM2 2048 tokens (depths 0.1, 0.5, 0.9), Gemma 3 270M
# 8192 tokens (depths 0.5, 0.9; its original retrieves none of these keys, so its passkey figure says little).
# The int4 rows are those of int4 stored rotated (quantization.py), measured after the others
# (bench/results/quality/rotated-int4/, docs/QUALITY.md).
COSTS: dict[tuple[str, str, str], CacheDtypeCost] = {
    ("SmolLM2-135M-Instruct", "int8", "int8"):
        CacheDtypeCost("SmolLM2-135M-Instruct", 0.00057, 0.00066, "3/3 (original 3/3)"),
    ("SmolLM2-135M-Instruct", "fp8_e4m3", "fp8_e4m3"):
        CacheDtypeCost("SmolLM2-135M-Instruct", 0.00466, 0.00427, "3/3 (original 3/3)"),
    ("SmolLM2-135M-Instruct", "int8", "int4"):
        CacheDtypeCost("SmolLM2-135M-Instruct", 0.01084, 0.0067, "3/3 (original 3/3)"),
    ("SmolLM2-135M-Instruct", "int4", "int4"):
        CacheDtypeCost("SmolLM2-135M-Instruct", 0.04825, 0.0492, "3/3 (original 3/3)"),
    ("Gemma 3 270M", "int8", "int8"):
        CacheDtypeCost("Gemma 3 270M", 0.00258, 0.00515, "0/2 (original 0/2)"),
    ("Gemma 3 270M", "fp8_e4m3", "fp8_e4m3"):
        CacheDtypeCost("Gemma 3 270M", 0.00567, 0.00452, "1/2 (original 0/2)"),
    ("Gemma 3 270M", "int8", "int4"):
        CacheDtypeCost("Gemma 3 270M", 0.01247, 0.0108, None),
    ("Gemma 3 270M", "int4", "int4"):
        CacheDtypeCost("Gemma 3 270M", 0.12545, 0.1342, None),
}


def model_name(config) -> str | None:
    key = (config.architecture, config.hidden_size, config.num_hidden_layers, config.num_key_value_heads,
           config.head_dim)
    return MODELS.get(key)


def recorded_cost(config, cache_dtype: KVCacheDtype) -> CacheDtypeCost | None:
    """The measured cost of this cache dtype on this model at full rank, if it was measured."""
    name = model_name(config)
    exact = all(config.layer_ranks(i) == (config.num_key_value_heads,) * 2 for i in range(config.num_hidden_layers))
    if name is None or not exact:
        return None
    return COSTS.get((name, cache_dtype.k, cache_dtype.v))


def describe(config, cache_dtype: KVCacheDtype) -> str:
    """The start-up line's words on the cache dtype."""
    cost = recorded_cost(config, cache_dtype)
    where = f"KV cache stored as {cache_dtype.name()}"
    if cost is None:
        return f"{where}: its cost on this model is not measured (tpa-eval --kv-cache-dtype measures it)"
    return (f"{where}: measured on {cost.model}, perplexity {cost.perplexity_change:+.2%} on held-out prose, "
            f"KL {cost.kl:.4f} nats/token, passkey {cost.passkey or 'not measured'} (docs/QUALITY.md)")
