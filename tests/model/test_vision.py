"""Our SigLIP tower + Gemma 3 projector against transformers' Gemma3ForConditionalGeneration, in float32."""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # the reference implementation; a test-only dependency
from safetensors import safe_open

from tpa_model.model.config import ConfigError
from tpa_model.model.vision import (
    MultiModalProjector,
    VisionConfig,
    VisionTower,
    hf_projector_prefix,
    hf_vision_prefix,
)

TOL = 1e-5
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    image_size=56, patch_size=14, layer_norm_eps=1e-5,  # 4x4 = 16 patches
)
TINY_TEXT = dict(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
)


def tiny_hf_config() -> transformers.Gemma3Config:
    return transformers.Gemma3Config(
        text_config=transformers.Gemma3TextConfig(**TINY_TEXT).to_dict(),
        vision_config=transformers.SiglipVisionConfig(**TINY_VISION, vision_use_head=False).to_dict(),
        mm_tokens_per_image=4,  # 4x4 patches pooled to 2x2 tokens
        boi_token_index=297, eoi_token_index=298, image_token_index=299,
        attn_implementation="eager",
    )


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(saved directory, reference model) with every weight random, norms far from their identity values."""
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(tiny_hf_config()).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))  # LayerNorm gains; RMSNorm (1 + w)
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("gemma3_vision")
    model.save_pretrained(path)
    return path, model


def load_ours(state: dict[str, torch.Tensor], config: VisionConfig, text_hidden: int):
    vp, pp = hf_vision_prefix(state), hf_projector_prefix(state)
    assert vp is not None and pp is not None
    tower, projector = VisionTower(config), MultiModalProjector(config, text_hidden)
    tower.load_state_dict({k[len(vp):]: v for k, v in state.items() if k.startswith(vp)}, strict=True)
    projector.load_state_dict({k[len(pp):]: v for k, v in state.items() if k.startswith(pp)}, strict=True)
    return tower.eval(), projector.eval()


def reference_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model.model.get_image_features(pixel_values)
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # an output object in transformers 5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("source", ["state_dict", "safetensors"])
def test_image_features_match_reference(hf_model, source):
    path, model = hf_model
    config = VisionConfig.from_hf(json.loads((path / "config.json").read_text()))
    assert (config.hidden_size, config.num_patches, config.mm_tokens_per_image) == (32, 16, 4)
    assert config.layer_norm_eps == 1e-5
    if source == "state_dict":
        state = model.state_dict()
    else:
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    tower, projector = load_ours(state, config, TINY_TEXT["hidden_size"])

    pixel_values = torch.rand(3, 3, 56, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1
    patches = tower(pixel_values)
    assert patches.shape == (3, 16, 32)
    ref_patches = model.model.vision_tower(pixel_values=pixel_values).last_hidden_state
    patch_diff = max_diff(patches, ref_patches)

    features = projector(patches)
    expected = reference_features(model, pixel_values)
    assert features.shape == expected.shape == (3, 4, 64)
    diff = max_diff(features, expected)
    print(f"{source}: vision tower max abs diff {patch_diff:.3e}, image features {diff:.3e} "
          f"(feature scale {expected.abs().max():.2f})")
    assert patch_diff <= TOL
    assert diff <= TOL
    # The images differ, so a broken batch dimension (mixing images) would show here.
    assert max_diff(features[0], features[1]) > 1e-2


@torch.no_grad()
def test_projector_pools_row_major_grid():
    """Each soft token averages one 2x2 block of the row-major patch grid (identity norm/projection aside)."""
    config = VisionConfig(hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                          image_size=56, patch_size=14, mm_tokens_per_image=4)
    projector = MultiModalProjector(config, text_hidden_size=4)
    projector.mm_input_projection_weight.copy_(torch.eye(4))
    projector.mm_soft_emb_norm.eps = 1e-12
    patches = torch.zeros(1, 16, 4)
    patches[0, 0, 0] = patches[0, 1, 0] = patches[0, 4, 0] = patches[0, 5, 0] = 1.0  # top-left 2x2 block
    patches[0, 15, 1] = 1.0  # bottom-right corner
    out = projector(patches)
    assert torch.allclose(out[0, 0], torch.tensor([2.0, 0, 0, 0]))  # mean 1 in one of 4 channels -> rms 1/2
    assert torch.allclose(out[0, 3], torch.tensor([0, 2.0, 0, 0]))
    assert out[0, 1].abs().max() == 0 and out[0, 2].abs().max() == 0


HF_TOWER_KEYS = [
    "embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias",
    "embeddings.position_embedding.weight", "encoder.layers.0.self_attn.q_proj.weight", "post_layernorm.weight",
]
TEXT_KEYS = ["model.language_model.embed_tokens.weight", "language_model.model.layers.0.mlp.up_proj.weight"]


@pytest.mark.parametrize(
    "vision_prefix,projector_prefix",
    [
        ("vision_tower.vision_model.", "multi_modal_projector."),  # Hub checkpoints
        ("model.vision_tower.vision_model.", "model.multi_modal_projector."),  # transformers >= 4.52
        ("vision_tower.", "multi_modal_projector."),  # save_pretrained in transformers 5
        ("model.vision_tower.", "model.multi_modal_projector."),  # transformers 5 in memory
    ],
)
def test_prefix_detection(vision_prefix, projector_prefix):
    keys = TEXT_KEYS + [vision_prefix + k for k in HF_TOWER_KEYS]
    keys += [projector_prefix + "mm_input_projection_weight", projector_prefix + "mm_soft_emb_norm.weight"]
    assert hf_vision_prefix(iter(keys)) == vision_prefix
    assert hf_projector_prefix(iter(keys)) == projector_prefix


def test_prefix_detection_text_only():
    assert hf_vision_prefix(TEXT_KEYS) is None
    assert hf_projector_prefix(TEXT_KEYS) is None


def test_prefix_detection_on_real_layouts(hf_model):
    path, model = hf_model
    assert hf_vision_prefix(model.state_dict()) == "model.vision_tower."
    assert hf_projector_prefix(model.state_dict()) == "model.multi_modal_projector."
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        on_disk = list(f.keys())
    assert hf_vision_prefix(on_disk) in ("vision_tower.vision_model.", "vision_tower.")
    assert hf_projector_prefix(on_disk) == "multi_modal_projector."


def test_config_from_sparse_hub_config():
    """The Hub's gemma-3-4b-it config.json spells out only some vision fields; the rest are Gemma 3 defaults."""
    hub = {
        "model_type": "gemma3",
        "mm_tokens_per_image": 256,
        "text_config": {"hidden_size": 2560, "model_type": "gemma3_text"},
        "vision_config": {
            "hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
            "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False,
        },
    }
    config = VisionConfig.from_hf(hub)
    assert config == VisionConfig()
    assert (config.num_patches, config.tokens_per_side, config.head_dim) == (4096, 16, 72)
    assert VisionConfig.from_hf({"model_type": "gemma3", "vision_config": {}}) == VisionConfig()
    assert VisionConfig.from_hf({"model_type": "gemma3", "vision_config": {"hidden_size": 32, "num_attention_heads": 4,
                                                                           "image_size": 56}, "mm_tokens_per_image": 4}
                                ) == VisionConfig(hidden_size=32, num_attention_heads=4, image_size=56,
                                                  mm_tokens_per_image=4)


def test_config_round_trip():
    config = VisionConfig(**TINY_VISION, mm_tokens_per_image=4)
    assert VisionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_a_declared_pooling_head_is_ignored(tmp_path):
    """vision_use_head: true adds SigLIP's pooling head to the checkpoint; Gemma 3 never runs it."""
    from tpa_model import load_model

    config = tiny_hf_config()
    config.vision_config.vision_use_head = True
    torch.manual_seed(0)
    ref = transformers.Gemma3ForConditionalGeneration(config).eval()
    ref.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert any(".head." in key for key in f.keys())
    ids = torch.tensor([[2, 297, 299, 299, 299, 299, 298, 5, 6]])
    pixels = torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == 299).long()).logits
        ours = load_model(tmp_path)(ids, pixel_values=pixels)
    assert max_diff(ours, expected) <= 1e-4


def test_config_rejects_bad_shapes():
    with pytest.raises(ConfigError, match="no vision tower"):
        VisionConfig.from_hf({"model_type": "gemma3_text", "hidden_size": 1152})
    with pytest.raises(ConfigError, match="square"):
        VisionConfig(mm_tokens_per_image=200)
    with pytest.raises(ConfigError, match="pooled"):
        VisionConfig(image_size=56, patch_size=14, mm_tokens_per_image=9)


def test_tower_rejects_wrong_image_size():
    tower = VisionTower(VisionConfig(**TINY_VISION, mm_tokens_per_image=4))
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        tower(torch.zeros(1, 3, 64, 64))
