"""Gemma 3 with images: full-model parity with transformers, the image attention mask, prompt assembly."""

import pytest
import torch

from tpa_model import ContiguousKVCache, load_model, preset, save_model
from tpa_model.cache.backends.reference import ReferenceBackend, key_visibility
from tpa_model.cache.metadata import image_spans
from tpa_model.tokenizers.prompts import expand_images

TOL = 1e-4
BOI, EOI, IMG, MM = 310, 311, 312, 4  # ids set in conftest.multimodal_config


def prompt_with_images(gen, segments):
    """Random text ids with an image run (boi, MM image tokens, eoi) wherever segments has None."""
    ids = []
    for seg in segments:
        if seg is None:
            ids += [BOI] + [IMG] * MM + [EOI]
        else:
            ids += torch.randint(3, 300, (seg,), generator=gen).tolist()
    return torch.tensor([ids])


@pytest.fixture(scope="module")
def pixels():
    gen = torch.Generator().manual_seed(7)
    return torch.rand(2, 3, 56, 56, generator=gen) * 2 - 1


CASES = {
    "one image": [5, None, 12],
    "two images in one message": [4, None, 3, None, 9],  # 30 tokens > window 8: images cross windows
    "images in two turns": [3, None, 14, None, 6],
}


@torch.no_grad()
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("full_rank_tpa", [False, True])
def test_image_parity(hf_multimodal, pixels, case, full_rank_tpa):
    path, ref = hf_multimodal
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    ids = prompt_with_images(gen, CASES[case])
    n_images = CASES[case].count(None)
    pv = pixels[:n_images]
    token_type_ids = (ids == IMG).long()
    expected = ref(input_ids=ids, pixel_values=pv, token_type_ids=token_type_ids).logits
    G = ref.config.text_config.num_key_value_heads
    ours = load_model(path, k_rank=G, v_rank=G) if full_rank_tpa else load_model(path)
    diff = (ours(ids, pixel_values=pv) - expected).abs().max().item()
    print(f"{case}, TPA full rank={full_rank_tpa}: max abs diff {diff:.3e}")
    assert diff <= TOL
    # the images really matter: other pixels give other logits
    assert (ours(ids, pixel_values=-pv) - expected).abs().max().item() > 100 * TOL


@torch.no_grad()
def test_vision_weights_survive_tpa_checkpoint(hf_multimodal, pixels, tmp_path):
    path, ref = hf_multimodal
    ids = prompt_with_images(torch.Generator().manual_seed(1), [3, None, 5])
    expected = ref(input_ids=ids, pixel_values=pixels[:1], token_type_ids=(ids == IMG).long()).logits
    save_model(load_model(path), tmp_path)
    reloaded = load_model(tmp_path)
    assert reloaded.vision_config is not None and reloaded.image_token_id == IMG
    assert (reloaded(ids, pixel_values=pixels[:1]) - expected).abs().max().item() <= TOL


def test_image_mask_hand_checked():
    """t t [i i] t [i i] t: image tokens see their own image both ways, text stays causal."""
    tokens = [0, 0, IMG, IMG, 0, IMG, IMG, 0]
    assert image_spans(tokens, IMG) == [(2, 4), (5, 7)]
    cache = ContiguousKVCache(preset("tiny"), 1, 8, backend=ReferenceBackend())
    meta = cache.step(8, images=[image_spans(tokens, IMG)])
    assert meta.limits.tolist() == [0, 1, 3, 3, 4, 6, 6, 7]
    pos = meta.positions[None]
    full = key_visibility(torch.zeros(1, dtype=torch.long), 0, 8, pos, meta.limits[None], None)[0]
    sliding = key_visibility(torch.zeros(1, dtype=torch.long), 0, 8, pos, meta.limits[None], 3)[0]
    T, F = True, False
    expected_full = torch.tensor([
        [T, F, F, F, F, F, F, F],
        [T, T, F, F, F, F, F, F],
        [T, T, T, T, F, F, F, F],  # first image token sees the second one
        [T, T, T, T, F, F, F, F],
        [T, T, T, T, T, F, F, F],
        [T, T, T, T, T, T, T, F],  # second image: its own tokens, never the first image's later ones
        [T, T, T, T, T, T, T, F],
        [T, T, T, T, T, T, T, T],
    ])
    assert torch.equal(full, expected_full)
    window = (pos[0, :, None] - pos[0, None, :]) < 3
    assert torch.equal(sliding, expected_full & window)
    assert bool(sliding[2, 3]) and not bool(sliding[5, 2])


def test_prompt_expansion_matches_gemma_processor():
    text = "<start_of_turn>user\nLook:<start_of_image>ok<end_of_turn>\n"
    assert expand_images(text, 2) == (
        "<start_of_turn>user\nLook:\n\n<start_of_image><image_soft_token><image_soft_token>"
        "<end_of_image>\n\nok<end_of_turn>\n"
    )


@torch.no_grad()
def test_image_count_mismatch_is_a_clear_error(hf_multimodal, pixels):
    path, _ = hf_multimodal
    model = load_model(path)
    ids = prompt_with_images(torch.Generator().manual_seed(2), [3, None, 5])
    with pytest.raises(ValueError, match="the prompt has 4 image tokens, but 2 image"):
        model(ids, pixel_values=pixels)


def test_text_only_model_refuses_images(hf_causal, pixels):
    path, _ = hf_causal
    with pytest.raises(ValueError, match="no vision tower"):
        load_model(path).image_features(pixels)
