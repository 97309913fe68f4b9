"""Text model configs, parsed from every config.json form real checkpoints use, plus the TPA settings.

Two families share one config: Gemma 3 (q/k norms, (1 + w) RMSNorm, sandwich norms, GeGLU, scaled
embeddings, sliding-window layers) and Llama (plain RMSNorm, SwiGLU, all layers global).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SLIDING = "sliding_attention"
GLOBAL = "full_attention"

GEMMA3, LLAMA = "gemma3", "llama"

# Architectures whose config.json we accept.
HF_ARCHITECTURES = {
    "Gemma3ForConditionalGeneration", "Gemma3ForCausalLM", "Gemma3TextModel", "Gemma3Model", "LlamaForCausalLM",
}
TPA_ARCHITECTURE = "Gemma3TPAForCausalLM"


class ConfigError(ValueError):
    """A config.json that does not describe a Gemma 3 model we can run."""


@dataclass
class TPAConfig:
    """Ranks of the factorization. None means exact: rank = number of heads, or full dense queries for Q."""

    k_rank: int | None = None
    v_rank: int | None = None
    q_rank: int | None = None
    layer_ranks: list[list[int]] | None = None  # [k_rank, v_rank] of every layer; overrides k_rank and v_rank
    contextual_heads: bool = False  # key/value head factors have a learned token-dependent part (T6's form)
    factorization: str = "basis"  # "basis": a head basis per layer; "svd": each token's keys factored on write


@dataclass
class TextConfig:
    architecture: str = GEMMA3  # the model family: GEMMA3 or LLAMA
    vocab_size: int = 262_208
    hidden_size: int = 2560
    intermediate_size: int = 10_240
    num_hidden_layers: int = 34
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    query_pre_attn_scalar: float = 256
    rms_norm_eps: float = 1e-6
    sliding_window: int = 1024
    layer_types: list[str] = field(default_factory=list)
    rope_local_theta: float = 10_000.0
    rope_global_theta: float = 1_000_000.0
    rope_global_scaling: float = 1.0  # linear RoPE scaling factor, global layers only
    rope_llama3: dict[str, float] | None = None  # Llama 3's frequency-dependent RoPE scaling, global layers
    max_position_embeddings: int = 131_072
    final_logit_softcapping: float | None = None
    # Gemma 3 configs carry this Gemma 2 field, but Gemma 3 attention never applies it (nor does the reference).
    attn_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int = 2
    eos_token_id: list[int] = field(default_factory=lambda: [1, 106])
    pad_token_id: int = 0
    tpa: TPAConfig = field(default_factory=TPAConfig)

    def __post_init__(self) -> None:
        if self.architecture not in (GEMMA3, LLAMA):
            raise ConfigError(f"unknown model family {self.architecture!r}; expected {GEMMA3!r} or {LLAMA!r}")
        if not self.layer_types and self.architecture == LLAMA:
            self.layer_types = [GLOBAL] * self.num_hidden_layers
        if not self.layer_types:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        unknown = set(self.layer_types) - {SLIDING, GLOBAL}
        if unknown:
            raise ConfigError(f"unknown layer types {sorted(unknown)}; expected {SLIDING!r} or {GLOBAL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for name, rank, limit in (
            ("k_rank", self.tpa.k_rank, self.num_key_value_heads),
            ("v_rank", self.tpa.v_rank, self.num_key_value_heads),
            ("q_rank", self.tpa.q_rank, self.num_attention_heads),
        ):
            if rank is not None and not 1 <= rank <= limit:
                raise ConfigError(f"{name} must be between 1 and {limit} (the number of heads), got {rank}")
        if self.tpa.factorization not in ("basis", "svd"):
            raise ConfigError(f"tpa.factorization must be 'basis' or 'svd', got {self.tpa.factorization!r}")
        ranks = self.tpa.layer_ranks
        if ranks is not None:
            if len(ranks) != self.num_hidden_layers or any(len(r) != 2 for r in ranks):
                raise ConfigError(f"tpa.layer_ranks needs one [k_rank, v_rank] pair per layer "
                                  f"({self.num_hidden_layers}), got {ranks}")
            if any(not 1 <= int(r) <= self.num_key_value_heads for pair in ranks for r in pair):
                raise ConfigError(f"tpa.layer_ranks must be between 1 and {self.num_key_value_heads}, got {ranks}")
            self.tpa.layer_ranks = [[int(k), int(v)] for k, v in ranks]

    @property
    def k_rank(self) -> int:
        """The key rank (the largest of any layer when ranks differ per layer)."""
        if self.tpa.layer_ranks:
            return max(k for k, _ in self.tpa.layer_ranks)
        return self.tpa.k_rank or self.num_key_value_heads

    @property
    def v_rank(self) -> int:
        if self.tpa.layer_ranks:
            return max(v for _, v in self.tpa.layer_ranks)
        return self.tpa.v_rank or self.num_key_value_heads

    def layer_ranks(self, layer: int) -> tuple[int, int]:
        """(k_rank, v_rank) of one layer: what its attention computes and its cache stores."""
        if self.tpa.layer_ranks:
            k, v = self.tpa.layer_ranks[layer]
            return k, v
        return self.k_rank, self.v_rank

    @property
    def ranks_differ(self) -> bool:
        return len({self.layer_ranks(i) for i in range(self.num_hidden_layers)}) > 1

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def with_ranks(self, k_rank: int | None, v_rank: int | None, q_rank: int | None = None) -> TextConfig:
        tpa = TPAConfig(k_rank=k_rank, v_rank=v_rank, q_rank=q_rank, contextual_heads=self.tpa.contextual_heads,
                        factorization=self.tpa.factorization)
        return dataclasses.replace(self, tpa=tpa)

    def with_layer_ranks(self, ranks: list[tuple[int, int]], q_rank: int | None = None) -> TextConfig:
        """Ranks per layer; equal ranks everywhere are stored as one pair."""
        if len(set(ranks)) == 1:
            return self.with_ranks(*ranks[0], q_rank)
        tpa = TPAConfig(q_rank=q_rank, layer_ranks=[list(r) for r in ranks], contextual_heads=self.tpa.contextual_heads,
                        factorization=self.tpa.factorization)
        return dataclasses.replace(self, tpa=tpa)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        d = dict(d)
        tpa = TPAConfig(**d.pop("tpa", {}) or {})
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known}, tpa=tpa)


def default_layer_types(num_layers: int, pattern: int = 6) -> list[str]:
    """Gemma 3 interleaves 5 sliding-window layers with 1 global layer."""
    return [GLOBAL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)]


# Gemma 3 defaults for fields the sparse Hub configs (4b/12b/27b) leave out.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "sliding_window_pattern": 6,
    "sliding_window": 4096,
    "max_position_embeddings": 131_072,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
}


def _rope_from_hf(text: dict[str, Any]) -> tuple[float, float, float]:
    """(local theta, global theta, global linear factor) from any of the RoPE config forms."""
    local_theta = float(text.get("rope_local_base_freq", _HF_DEFAULTS["rope_local_base_freq"]))
    global_theta = float(text.get("rope_theta", _HF_DEFAULTS["rope_theta"]))
    global_params = text.get("rope_scaling") or {}
    params = text.get("rope_parameters")
    if params:
        if GLOBAL in params or SLIDING in params:  # transformers >= 5: one entry per layer type
            local = params.get(SLIDING) or {}
            _check_rope_type(local, SLIDING, allow_scaling=False)
            local_theta = float(local.get("rope_theta", local_theta))
            global_params = params.get(GLOBAL) or {}
        else:
            global_params = params
        global_theta = float(global_params.get("rope_theta", global_theta))
    _check_rope_type(global_params, GLOBAL, allow_scaling=True)
    factor = float(global_params.get("factor", 1.0)) if global_params.get("rope_type") == "linear" else 1.0
    return local_theta, global_theta, factor


def _check_rope_type(params: dict[str, Any], layer_type: str, allow_scaling: bool) -> None:
    rope_type = params.get("rope_type", params.get("type", "default"))
    allowed = ("default", "linear") if allow_scaling else ("default",)
    if rope_type not in allowed:
        raise ConfigError(f"RoPE type {rope_type!r} on {layer_type} layers is not supported (expected {allowed})")


def text_config_from_hf(config: dict[str, Any]) -> TextConfig:
    """Parse a Hugging Face config.json: Gemma 3 (multimodal, text-only, sparse or full) or Llama."""
    model_type = config.get("model_type")
    if model_type == "llama":
        return llama_config_from_hf(config)
    if model_type == "gemma3":
        text = dict(config.get("text_config") or {})
    elif model_type == "gemma3_text":
        text = dict(config)
    else:
        raise ConfigError(f"model_type {model_type!r} is not supported (expected 'gemma3', 'gemma3_text' or 'llama')")
    if text.get("use_bidirectional_attention"):
        raise ConfigError("bidirectional Gemma 3 (embedding) models are not supported")
    if text.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"hidden_activation {text['hidden_activation']!r} is not supported")

    def get(name: str) -> Any:
        value = text.get(name)
        return _HF_DEFAULTS[name] if value is None else value

    num_layers = int(get("num_hidden_layers"))
    layer_types = text.get("layer_types") or default_layer_types(num_layers, int(get("sliding_window_pattern")))
    local_theta, global_theta, factor = _rope_from_hf(text)
    eos = text.get("eos_token_id", config.get("eos_token_id", [1, 106]))
    return TextConfig(
        vocab_size=int(get("vocab_size")),
        hidden_size=int(get("hidden_size")),
        intermediate_size=int(get("intermediate_size")),
        num_hidden_layers=num_layers,
        num_attention_heads=int(get("num_attention_heads")),
        num_key_value_heads=int(get("num_key_value_heads")),
        head_dim=int(get("head_dim")),
        query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
        rms_norm_eps=float(get("rms_norm_eps")),
        sliding_window=int(get("sliding_window")),
        layer_types=list(layer_types),
        rope_local_theta=local_theta,
        rope_global_theta=global_theta,
        rope_global_scaling=factor,
        max_position_embeddings=int(get("max_position_embeddings")),
        final_logit_softcapping=text.get("final_logit_softcapping"),
        attn_logit_softcapping=text.get("attn_logit_softcapping"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
        bos_token_id=int(text.get("bos_token_id", config.get("bos_token_id", 2)) or 2),
        eos_token_id=[int(e) for e in (eos if isinstance(eos, list) else [eos])],
        pad_token_id=int(text.get("pad_token_id", config.get("pad_token_id", 0)) or 0),
    )


def llama_config_from_hf(config: dict[str, Any]) -> TextConfig:
    """A Llama-architecture config.json (Llama 2/3, SmolLM2): every layer global, no q/k norms."""
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ConfigError("Llama checkpoints with attention or MLP biases are not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {config['hidden_act']!r} is not supported (expected 'silu')")
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ConfigError(f"RoPE type {rope_type!r} is not supported (expected default, linear or llama3)")
    llama3 = None
    if rope_type == "llama3":
        llama3 = {k: float(params[k]) for k in
                  ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    eos = config.get("eos_token_id", 2)
    layers = int(config["num_hidden_layers"])
    return TextConfig(
        architecture=LLAMA,
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        query_pre_attn_scalar=float(head_dim),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        sliding_window=int(config.get("max_position_embeddings", 4096)),  # no layer slides
        layer_types=[GLOBAL] * layers,
        rope_global_theta=float(params.get("rope_theta", config.get("rope_theta", 10_000.0))),
        rope_global_scaling=float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0,
        rope_llama3=llama3,
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=int(config.get("bos_token_id") if config.get("bos_token_id") is not None else 1),
        eos_token_id=[int(e) for e in (eos if isinstance(eos, list) else [eos])],
        pad_token_id=int(config.get("pad_token_id") if config.get("pad_token_id") is not None else 0),
    )


def _preset(**kw: Any) -> TextConfig:
    return TextConfig(**kw)


# Published Gemma 3 sizes (from the released config.json files), and a tiny one for tests and the demo.
PRESETS: dict[str, TextConfig] = {
    "1b": _preset(
        vocab_size=262_144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=512, max_position_embeddings=32_768,
    ),
    "4b": _preset(
        hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, rope_global_scaling=8.0,
    ),
    "12b": _preset(
        hidden_size=3840, intermediate_size=15_360, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, rope_global_scaling=8.0,
    ),
    "27b": _preset(
        hidden_size=5376, intermediate_size=21_504, num_hidden_layers=62, num_attention_heads=32,
        num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168, rope_global_scaling=8.0,
    ),
    "tiny": _preset(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
        max_position_embeddings=4096, rope_global_scaling=8.0,
    ),
}


def preset(name: str) -> TextConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], tpa=TPAConfig(), layer_types=list(PRESETS[name].layer_types))
