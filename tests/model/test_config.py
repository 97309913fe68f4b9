"""Config parsing for every config.json form that real Gemma 3 checkpoints use."""

import dataclasses

import pytest
import transformers

from tpa_model import PRESETS, preset, text_config_from_hf
from tpa_model.model.config import GLOBAL, SLIDING, ConfigError

SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window", "layer_types",
    "rope_local_theta", "rope_global_theta", "rope_global_scaling", "rms_norm_eps",
)

VISION = {
    "hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
    "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False,
}
LINEAR8 = {"factor": 8.0, "rope_type": "linear"}


def hub_multimodal(text_config):
    """The sparse form of the published 4b/12b/27b config.json files."""
    return {
        "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
        "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
        "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
        "text_config": text_config, "torch_dtype": "bfloat16", "vision_config": VISION,
    }


HUB_CONFIGS = {
    "4b": hub_multimodal({
        "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
        "rope_scaling": LINEAR8, "sliding_window": 1024,
    }),
    "12b": hub_multimodal({
        "hidden_size": 3840, "intermediate_size": 15360, "model_type": "gemma3_text", "num_attention_heads": 16,
        "num_hidden_layers": 48, "num_key_value_heads": 8, "rope_scaling": LINEAR8, "sliding_window": 1024,
    }),
    "27b": hub_multimodal({
        "head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504, "model_type": "gemma3_text",
        "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16,
        "query_pre_attn_scalar": 168, "rope_scaling": LINEAR8, "sliding_window": 1024,
    }),
    "1b": {
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
        "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
        "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
        "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 262144,
    },
}


def shape(cfg):
    return {f: getattr(cfg, f) for f in SHAPE_FIELDS}


@pytest.mark.parametrize("name", ["1b", "4b", "12b", "27b"])
def test_hub_configs_parse_to_the_presets(name):
    assert shape(text_config_from_hf(HUB_CONFIGS[name])) == shape(PRESETS[name])


@pytest.mark.parametrize("name", ["1b", "4b", "12b", "27b"])
def test_new_form_with_layer_types_and_rope_parameters(name):
    """transformers >= 5 writes layer_types and per-layer-type rope_parameters: same model."""
    hub = HUB_CONFIGS[name]
    if hub["model_type"] == "gemma3":
        new = transformers.Gemma3Config(**{k: v for k, v in hub.items() if k != "architectures"}).to_dict()
        assert "rope_parameters" in new["text_config"] and "layer_types" in new["text_config"]
    else:
        new = transformers.Gemma3TextConfig(**hub).to_dict()
        assert "rope_parameters" in new and "layer_types" in new
    assert shape(text_config_from_hf(new)) == shape(PRESETS[name])


def test_preset_layer_pattern_and_rope():
    cfg = preset("27b")
    assert cfg.layer_types[:6] == [SLIDING] * 5 + [GLOBAL]
    assert sum(t == GLOBAL for t in cfg.layer_types) == 10
    assert cfg.rope_global_scaling == 8.0 and cfg.rope_local_theta == 10_000 and cfg.rope_global_theta == 1e6
    assert preset("1b").rope_global_scaling == 1.0


def test_presets_are_independent_copies():
    cfg = preset("4b")
    cfg.layer_types[0] = GLOBAL
    assert PRESETS["4b"].layer_types[0] == SLIDING


def test_round_trip_through_dict():
    from tpa_model import TextConfig

    cfg = preset("12b").with_ranks(2, 3)
    again = TextConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.k_rank == 2 and again.v_rank == 3


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"model_type": "mistral"}, "model_type .mistral. is not supported"),
        ({"model_type": "gemma3_text", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "bidirectional"),
        ({"model_type": "gemma3_text", "num_attention_heads": 6, "num_key_value_heads": 4}, "multiple"),
    ],
)
def test_bad_configs_are_rejected(bad, match):
    with pytest.raises(ConfigError, match=match):
        text_config_from_hf(bad)


def test_rank_bounds():
    with pytest.raises(ConfigError, match="k_rank must be between 1 and 4"):
        dataclasses.replace(preset("4b")).with_ranks(5, None)
