"""The two real models that install offline (Gemma 3 270M and SmolLM2-135M-Instruct, GGUF files) against
transformers loading the same files: logits, and greedy generation through the engine."""

from __future__ import annotations

import pytest
import torch
from conftest import real_model_path

from server.engine.engine import EngineConfig, LLMEngine
from tpa_model import load_model
from tpa_model.sampling import SamplingParams
from tpa_model.tokenizers.hf_tokenizer import load_tokenizer

TOL = 1e-3
MODELS = ["gemma-3-270m", "smollm2"]
PROSE = (
    "The history of the printing press begins in the fifteenth century, when movable type made books cheaper "
    "to produce than ever before. Within a few decades, presses had spread across Europe, and the number of "
    "books in circulation grew from thousands to millions. Scholars could compare texts, merchants could print "
    "price lists, and reformers could reach readers far from their own towns. "
)


@pytest.fixture(scope="module", params=MODELS)
def real(request, hf_reference):
    """(name, our model, our tokenizer, transformers' model), float32, loaded once per model."""
    path = real_model_path(request.param)
    return request.param, load_model(path), load_tokenizer(path), hf_reference(request.param)


def prompts(tokenizer, name: str) -> list[list[int]]:
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    texts = ["The capital of France is", "def fibonacci(n):\n    ", PROSE[:200]]
    ids = [tokenizer.encode(t, add_bos=True) for t in texts] + [tokenizer.encode_chat(chat)]
    long = tokenizer.encode(PROSE * 12, add_bos=True)[:700]  # past Gemma 3 270M's 512-token window
    return ids + [long]


@torch.no_grad()
def test_logits_equal_transformers(real):
    name, ours, tokenizer, ref = real
    worst = 0.0
    for ids in prompts(tokenizer, name):
        x = torch.tensor([ids])
        diff = (ours(x) - ref(x).logits).abs().max().item()
        worst = max(worst, diff)
    print(f"{name}: max abs logit difference against transformers over 5 prompts (up to 700 tokens): {worst:.2e}")
    assert worst <= TOL


@torch.no_grad()
def test_engine_greedy_equals_transformers_generate(real):
    """32 greedy tokens per prompt, all prompts batched in one engine, two of them sharing a long prefix."""
    name, ours, tokenizer, ref = real
    ids = prompts(tokenizer, name)[:4]
    shared = tokenizer.encode(PROSE, add_bos=True)
    ids += [shared + tokenizer.encode(" In short,"), shared + tokenizer.encode(" The first")]
    # greedy, 32 tokens, past any eos as ignore_eos goes (min_new_tokens would forbid eos: another search)
    eos, ref.generation_config.eos_token_id = ref.generation_config.eos_token_id, None
    try:
        expected = [ref.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, pad_token_id=0)[0, len(p):]
                    .tolist() for p in ids]
    finally:
        ref.generation_config.eos_token_id = eos
    assert all(len(e) == 32 for e in expected)
    engine = LLMEngine(ours, tokenizer, EngineConfig(max_model_len=1024, cache_memory_gib=0.25,
                                                     max_num_batched_tokens=256))
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(ids[:-1]):
        engine.add_request(f"r{i}", p, params)
    done = {}
    while engine.requests["r4"][0].num_computed < len(shared):  # the pair's first has its prefix cached
        engine.step()
    engine.add_request("r5", ids[-1], params)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert done["r5"].num_cached_tokens > 0  # the second of the pair reused the first's prefix blocks
    for i, exp in enumerate(expected):
        assert done[f"r{i}"].outputs[0].token_ids == exp, f"{name}, prompt {i}"
