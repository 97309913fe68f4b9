"""Our Gemma 3 TPA model against transformers' Gemma 3, logits in float32."""

import pytest
import torch
from conftest import save_hf_causal

import tpa_model
from tpa_model import ContiguousKVCache, load_model
from tpa_model.cache.backends.reference import ReferenceBackend

TOL = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def test_causal_lm_parity(hf_causal, token_ids):
    path, ref = hf_causal
    ours = load_model(path)
    assert ours.config.rope_global_scaling == 8.0 and ours.config.query_pre_attn_scalar == 24
    assert token_ids.shape[1] > ours.config.sliding_window
    expected = ref(token_ids).logits
    diff = max_diff(ours(token_ids), expected)
    print(f"Gemma3ForCausalLM parity: max abs diff {diff:.3e} (logit scale {expected.abs().max():.2f})")
    assert diff <= TOL


@torch.no_grad()
def test_conditional_generation_parity(hf_multimodal, token_ids):
    path, ref = hf_multimodal
    ours = load_model(path)
    expected = ref(input_ids=token_ids).logits
    diff = max_diff(ours(token_ids), expected)
    print(f"Gemma3ForConditionalGeneration (text) parity: max abs diff {diff:.3e}")
    assert diff <= TOL


@torch.no_grad()
def test_sharded_checkpoint_parity(tmp_path, token_ids):
    ref = save_hf_causal(tmp_path, seed=3, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    diff = max_diff(load_model(tmp_path)(token_ids), ref(token_ids).logits)
    print(f"sharded checkpoint parity: max abs diff {diff:.3e}")
    assert diff <= TOL


@torch.no_grad()
def test_softcapping_parity(tmp_path, token_ids):
    """Final logit softcapping applies; attn_logit_softcapping is carried by configs but unused by Gemma 3."""
    ref = save_hf_causal(tmp_path, seed=4, final_logit_softcapping=3.0, attn_logit_softcapping=5.0)
    ours = load_model(tmp_path)
    assert ours.config.final_logit_softcapping == 3.0
    assert max_diff(ours(token_ids), ref(token_ids).logits) <= TOL


@torch.no_grad()
def test_full_rank_tpa_equals_original(hf_causal, token_ids):
    path, ref = hf_causal
    G = ref.config.num_key_value_heads
    ours = load_model(path, k_rank=G, v_rank=G)
    assert ours.config.k_rank == G and ours.layers[0].attn.k.rank == G
    assert max_diff(ours(token_ids), ref(token_ids).logits) <= TOL


@torch.no_grad()
def test_full_rank_survives_save_and_load(hf_causal, token_ids, tmp_path):
    path, ref = hf_causal
    tpa_model.save_model(load_model(path), tmp_path)
    assert max_diff(load_model(tmp_path)(token_ids), ref(token_ids).logits) <= TOL


@torch.no_grad()
@pytest.mark.parametrize("chunks", [[29], [20, 9], [5, 11, 13]])
def test_incremental_decoding_equals_full_forward(hf_causal, token_ids, chunks):
    """Prefill in chunks, then decode one token at a time through the factor cache."""
    path, _ = hf_causal
    model = load_model(path, k_rank=2, v_rank=3)
    full = model(token_ids)
    prefill_len = sum(chunks[:-1]) if len(chunks) > 1 else 16
    B, T = token_ids.shape
    cache = ContiguousKVCache(model.config, B, T, backend=ReferenceBackend())
    pieces, start = [], 0

    def step(ids):
        meta = cache.step(ids.shape[1])
        return model(ids.reshape(-1), meta.positions, meta).view(B, ids.shape[1], -1)

    for n in chunks[:-1] if len(chunks) > 1 else [prefill_len]:
        pieces.append(step(token_ids[:, start : start + n]))
        start += n
    for t in range(start, T):
        pieces.append(step(token_ids[:, t : t + 1]))
    assert cache.seq_len == T
    assert max_diff(torch.cat(pieces, dim=1), full) <= TOL


@torch.no_grad()
def test_bfloat16_load_is_close(hf_causal, token_ids):
    path, ref = hf_causal
    ours = load_model(path, dtype=torch.bfloat16)
    assert ours.embed_tokens.weight.dtype == torch.bfloat16
    expected = ref(token_ids).logits
    assert max_diff(ours(token_ids), expected) <= 0.05 * expected.abs().max().item()
