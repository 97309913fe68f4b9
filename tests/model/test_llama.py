"""The Llama family (Llama 2/3, SmolLM2) on the same TPA attention, caches and engine, against transformers."""

import pytest
import torch
import transformers  # the reference implementation; a test-only dependency
from conftest import randomize

from server.engine.engine import EngineConfig, LLMEngine
from tpa_model import load_model, save_model
from tpa_model.generation import generate
from tpa_model.sampling import SamplingParams
from tpa_model.tokenizers.gemma_tokenizer import GemmaTokenizer

TOL = 1e-4
TINY_LLAMA = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=512, rope_theta=50_000.0,
)


def save_llama(path, **overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides}, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    randomize(model, seed=2)
    with torch.no_grad():  # Llama norms scale by w: keep them near 1 so every layer matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(1.0)
    model.save_pretrained(path)
    return model


ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 50_000.0}


@torch.no_grad()
@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, {"rope_parameters": ROPE_LLAMA3}],
                         ids=["untied", "tied", "llama3-rope"])
def test_logits_equal_transformers(tmp_path, overrides):
    ref = save_llama(tmp_path, **overrides)
    ours = load_model(tmp_path)
    assert ours.config.architecture == "llama" and set(ours.config.layer_types) == {"full_attention"}
    assert (ours.config.rope_llama3 is not None) == ("rope_parameters" in overrides)
    ids = torch.randint(0, 320, (2, 150), generator=torch.Generator().manual_seed(0))  # past the original 64
    diff = (ours(ids) - ref(ids).logits).abs().max().item()
    print(f"llama {overrides or 'plain'}: max abs logit difference {diff:.2e}")
    assert diff <= TOL


@torch.no_grad()
def test_full_rank_tpa_is_exact_and_low_rank_is_not(tmp_path):
    ref = save_llama(tmp_path)
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(1))
    exact = load_model(tmp_path, k_rank=2, v_rank=2)  # G = 2: full rank, the constant head basis
    assert (exact(ids) - ref(ids).logits).abs().max().item() <= TOL
    low = load_model(tmp_path, k_rank=1, v_rank=1)
    assert (low(ids) - ref(ids).logits).abs().max().item() > 100 * TOL
    save_model(low, tmp_path / "tpa")
    assert (load_model(tmp_path / "tpa")(ids) - low(ids)).abs().max().item() == 0


@pytest.mark.parametrize("ranks", [(None, None), (1, 1)], ids=["standard", "factors"])
def test_engine_serves_llama_like_generate(tmp_path, ranks):
    """All layers global: one pool; the engine's greedy tokens equal generate()'s, batched and chunked."""
    from tpa_model.checkpoints.demo import demo_model_dir

    save_llama(tmp_path)
    model = load_model(tmp_path, k_rank=ranks[0], v_rank=ranks[1])
    tokenizer = GemmaTokenizer.from_dir(demo_model_dir())  # only detokenizes; ids come from the test
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=4, num_blocks=200, max_num_batched_tokens=24))
    assert list(engine.managers) == ["global"]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 300, (int(n),), generator=gen).tolist() for n in (7, 30, 19, 45)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    for i, p in enumerate(prompts):
        assert done[f"r{i}"] == generate(model, [p], 20, vocab_limit=tokenizer.vocab_size)[0]
