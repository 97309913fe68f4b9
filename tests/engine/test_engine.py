"""The engine: paged factor cache + continuous batching, checked token for token against the contiguous path."""

import pytest
import torch

from server.engine.engine import EngineConfig, LLMEngine
from server.engine.llm import LLM
from tpa_model.checkpoints.demo import build_demo
from tpa_model.checkpoints.loader import load_model
from tpa_model.generation import generate
from tpa_model.sampling import SamplingParams
from tpa_model.tokenizers.gemma_tokenizer import GemmaTokenizer

BLOCK = 4


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine_model")
    build_demo(path)  # tiny random Gemma 3 TPA: 6 layers (5 sliding, window 16), 2 kv heads
    return path


@pytest.fixture(scope="module", params=["standard", "factors"])
def model(demo_dir, request):
    """Every engine test runs on both cache layouts: exact (plain K/V) and rank 1 (factors)."""
    if request.param == "standard":
        return load_model(demo_dir)
    return load_model(demo_dir, k_rank=1, v_rank=1)


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return GemmaTokenizer.from_dir(demo_dir)


def make_engine(model, tokenizer, global_blocks=64, sliding_blocks=64, **kw):
    cfg = EngineConfig(block_size=BLOCK, num_blocks={"global": global_blocks, "sliding": sliding_blocks}, **kw)
    return LLMEngine(model, tokenizer, cfg)


def run(engine, requests):
    """requests: {request_id: (prompt_ids, params)} -> {request_id: final RequestOutput}."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    return finish(engine)


def finish(engine):
    """Step until nothing is left: {request_id: final RequestOutput} of the requests that finished."""
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def prompts(n, seed=0, lo=5, hi=60):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=gen).tolist()
    return [[2] + torch.randint(10, 400, (L,), generator=gen).tolist() for L in lengths]


def all_free(engine):
    return all(used == 0 for used, _ in engine.block_usage().values())


GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_batch_with_preemption_equals_one_at_a_time(model, tokenizer):
    ps = prompts(16)
    expected = [generate(model, [p], 24)[0] for p in ps]  # contiguous cache, one prompt at a time
    engine = make_engine(model, tokenizer, global_blocks=48, sliding_blocks=40, max_num_seqs=16,
                         max_num_batched_tokens=64)
    done = run(engine, {f"r{i}": (p, SamplingParams(max_tokens=24, **GREEDY)) for i, p in enumerate(ps)})
    assert engine.num_preemptions > 0
    for i, exp in enumerate(expected):
        assert done[f"r{i}"].outputs[0].token_ids == exp, f"request {i} differs"
        assert done[f"r{i}"].outputs[0].finish_reason == "length"
    assert all_free(engine)


def test_sliding_layers_hold_only_the_window(model, tokenizer):
    engine = make_engine(model, tokenizer)
    engine.add_request("long", prompts(1, lo=10, hi=11)[0], SamplingParams(max_tokens=120, **GREEDY))
    window = model.config.sliding_window
    most = 0
    while engine.has_unfinished():
        engine.step()
        seq_tables = engine.managers["sliding"].tables
        for seq_id in seq_tables:
            most = max(most, engine.managers["sliding"].live_blocks(seq_id))
            assert engine.managers["sliding"].live_blocks(seq_id) <= window // BLOCK + 1
        for seq in engine.requests.get("long", []):
            if seq.seq_id in engine.managers["global"].tables:  # global layers keep every block
                assert engine.managers["global"].live_blocks(seq.seq_id) == -(-seq.num_computed // BLOCK)
    assert most == window // BLOCK + 1
    assert all_free(engine)


def test_aborts_free_every_block(model, tokenizer):
    engine = make_engine(model, tokenizer, max_num_batched_tokens=8)
    long_prompt = prompts(1, lo=50, hi=51)[0]
    engine.add_request("prefilling", long_prompt, SamplingParams(max_tokens=50, **GREEDY))
    engine.add_request("decoding", [2, 11, 12], SamplingParams(max_tokens=50, **GREEDY))
    engine.add_request("finishing", [2, 13, 14], SamplingParams(max_tokens=3, **GREEDY))
    for _ in range(3):
        engine.step()
    prefill_seq = engine.requests["prefilling"][0]
    assert 0 < prefill_seq.num_computed < len(long_prompt), "abort must happen mid-prefill"
    assert engine.abort("prefilling")
    while len(engine.requests["decoding"][0].output_ids) < 5:
        engine.step()
    assert engine.abort("decoding")
    while engine.has_unfinished():
        engine.step()
    assert all_free(engine)
    assert not engine.abort("decoding")  # already gone


def test_prefix_sharing_saves_blocks_and_keeps_tokens(model, tokenizer):
    prefix = prompts(1, seed=3, lo=40, hi=41)[0]
    a, b = prefix + [20, 21, 22], prefix + [30, 31]
    params = SamplingParams(max_tokens=8, **GREEDY)
    results, used = {}, {}
    for sharing in (True, False):
        engine = make_engine(model, tokenizer, prefix_caching=sharing)
        engine.add_request("a", a, params)
        engine.step()  # a's whole prompt is computed and its full blocks published
        engine.add_request("b", b, params)
        engine.step()
        used[sharing] = engine.block_usage()["global"][0]
        cached = engine.requests["b"][0].num_cached_prompt
        assert (cached >= 40 - BLOCK) if sharing else cached == 0
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    results[(sharing, out.request_id)] = out.outputs[0].token_ids
        assert all_free(engine)
    assert used[True] < used[False]
    assert results[(True, "a")] == results[(False, "a")] == generate(model, [a], 8)[0]
    assert results[(True, "b")] == results[(False, "b")] == generate(model, [b], 8)[0]


def test_seeded_sampling_alone_equals_in_batch(model, tokenizer):
    ps = prompts(8, seed=5)
    params = [SamplingParams(max_tokens=16, temperature=0.7 + 0.1 * i, top_p=0.9, top_k=40, seed=100 + i,
                             ignore_eos=True) for i in range(8)]
    batch = run(make_engine(model, tokenizer), {f"r{i}": (p, q) for i, (p, q) in enumerate(zip(ps, params))})
    for i, (p, q) in enumerate(zip(ps, params)):
        alone = run(make_engine(model, tokenizer), {"x": (p, q)})["x"]
        assert alone.outputs[0].token_ids == batch[f"r{i}"].outputs[0].token_ids


def test_stop_string_split_across_tokens(model, tokenizer):
    prompt = prompts(1, seed=9)[0]
    free_run = run(make_engine(model, tokenizer), {"x": (prompt, SamplingParams(max_tokens=30, **GREEDY))})["x"]
    ids = free_run.outputs[0].token_ids
    # a stop string made of the end of one token's text and the start of the next's
    texts = [tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
    k = next(k for k in range(2, len(ids)) if len(texts[k]) - len(texts[k - 1]) >= 2 and
             len(texts[k + 1]) - len(texts[k]) >= 2)
    stop = texts[k][-2:] + texts[k + 1][len(texts[k]):][:2]
    full = free_run.outputs[0].text
    out = run(make_engine(model, tokenizer), {"x": (prompt, SamplingParams(max_tokens=30, stop=[stop], **GREEDY))})
    result = out["x"].outputs[0]
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)]
    assert stop not in result.text


def test_n_samples_and_offline_api(demo_dir):
    llm = LLM(demo_dir, engine_config=EngineConfig(block_size=BLOCK, cache_memory_gib=0.01))
    outs = llm.generate(
        ["The sky is", [{"role": "user", "content": "Hello"}]],
        SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=1, ignore_eos=True),
    )
    assert [len(o.outputs) for o in outs] == [3, 3]
    assert all(len(c.token_ids) == 6 for o in outs for c in o.outputs)
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) > 1  # different samples
    assert all_free(llm.engine)


def test_requests_that_cannot_fit_are_refused(model, tokenizer):
    # 8 global blocks of 4 tokens: one sequence can never exceed 32 tokens, so max_model_len is lowered to that
    engine = make_engine(model, tokenizer, global_blocks=8, sliding_blocks=6, max_model_len=4096)
    assert engine.max_model_len == 32
    with pytest.raises(ValueError, match=r"the prompt \(41 tokens\) fills the maximum model length of 32"):
        engine.add_request("big", prompts(1, lo=40, hi=41)[0], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"plus max_tokens \(10\) exceeds the maximum model length of 32"):
        engine.add_request("long", [2] * 25, SamplingParams(max_tokens=10))
    # the sliding layers' pool (6 blocks) cannot hold a 16-token window plus a 64-token prefill chunk
    with pytest.raises(ValueError, match="blocks of the sliding cache pool"):
        engine.add_request("chunky", [2] * 30, SamplingParams(max_tokens=2))
    assert all_free(engine) and not engine.has_unfinished()


def test_a_lone_sequence_can_always_finish(model, tokenizer):
    """A request admitted alone always completes: the cache holds max_model_len tokens for it."""
    engine = make_engine(model, tokenizer, global_blocks=10, sliding_blocks=30, max_num_batched_tokens=8)
    done = run(engine, {"x": ([2, 5, 6], SamplingParams(max_tokens=None, **GREEDY))})
    assert len(done["x"].outputs[0].token_ids) == engine.max_model_len - 3 == 37
    assert done["x"].outputs[0].finish_reason == "length"


def image_request(tokenizer, model, text, n_images, seed):
    from tpa_model.tokenizers.prompts import encode_chat_with_images

    gen = torch.Generator().manual_seed(seed)
    size = model.vision_config.image_size
    pixels = torch.rand(n_images, 3, size, size, generator=gen) * 2 - 1
    parts = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    ids = encode_chat_with_images(tokenizer, [{"role": "user", "content": parts}],
                                  model.vision_config.mm_tokens_per_image)
    return ids, pixels


@pytest.mark.parametrize("budget", [5, 64])
def test_images_in_the_engine_equal_the_contiguous_path(model, tokenizer, budget):
    """Small budgets chunk the prompt, but never through an image; results equal one-at-a-time."""
    reqs = {f"img{i}": image_request(tokenizer, model, f"Describe picture {i}.", 1 + i % 2, seed=i) for i in range(4)}
    expected = {rid: generate(model, [ids], 10, pixel_values=pv)[0] for rid, (ids, pv) in reqs.items()}
    engine = make_engine(model, tokenizer, max_num_batched_tokens=budget)
    params = SamplingParams(max_tokens=10, **GREEDY)
    for rid, (ids, pv) in reqs.items():
        engine.add_request(rid, ids, params, pixel_values=pv)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert done == expected
    assert all_free(engine)


def test_image_prefix_sharing_keys_on_pixels(model, tokenizer):
    ids, pv = image_request(tokenizer, model, "What is this? " * 6, 1, seed=1)
    params = SamplingParams(max_tokens=4, **GREEDY)
    engine = make_engine(model, tokenizer)
    engine.add_request("first", ids, params, pixel_values=pv)
    engine.step()
    engine.add_request("same", ids, params, pixel_values=pv)
    engine.add_request("other", ids, params, pixel_values=-pv)
    engine.step()
    assert engine.requests["same"][0].num_cached_prompt > 0
    image_end = engine.requests["other"][0].images[0].start
    assert engine.requests["other"][0].num_cached_prompt <= image_end  # nothing past the image is shared
    while engine.has_unfinished():
        engine.step()
    assert all_free(engine)


def test_image_count_mismatch_is_refused(model, tokenizer):
    ids, pv = image_request(tokenizer, model, "Two?", 2, seed=2)
    engine = make_engine(model, tokenizer)
    with pytest.raises(ValueError, match="2 image placeholder"):
        engine.add_request("x", ids, SamplingParams(), pixel_values=pv[:1])
    assert not engine.has_unfinished()


def test_n_samples_share_the_prompt(model, tokenizer):
    engine = make_engine(model, tokenizer)
    prompt = prompts(1, seed=4, lo=40, hi=41)[0]
    engine.add_request("n3", prompt, SamplingParams(n=3, max_tokens=5, temperature=1.0, seed=0, ignore_eos=True))
    done = run(engine, {})
    assert len(done["n3"].outputs) == 3
    hits = engine.managers["global"].pool.hits
    assert hits >= 2 * (len(prompt) // BLOCK - 1)  # samples 1 and 2 reuse sample 0's full prompt blocks
    # and the tokens are what each seed gives on its own
    for i, out in enumerate(done["n3"].outputs):
        alone = run(make_engine(model, tokenizer, prefix_caching=False),
                    {"x": (prompt, SamplingParams(max_tokens=5, temperature=1.0, seed=i, ignore_eos=True))})
        assert alone["x"].outputs[0].token_ids == out.token_ids


@pytest.mark.parametrize("layer_type", ["full_attention", "sliding_attention"])
@pytest.mark.parametrize("ranks", [(None, None), (1, 1)], ids=["standard", "factors"])
def test_all_global_and_all_sliding_models(demo_dir, tokenizer, layer_type, ranks):
    """Any layer mix is served: one pool only, global or windowed, either layout, like generate()."""
    import dataclasses

    from tpa_model.checkpoints.demo import init_weights
    from tpa_model.model.decoder import GemmaTPAModel

    base = load_model(demo_dir).config
    config = dataclasses.replace(base, layer_types=[layer_type] * base.num_hidden_layers).with_ranks(*ranks)
    model = GemmaTPAModel(config).eval()
    init_weights(model, seed=3, std=0.1)
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=BLOCK, num_blocks=48, max_num_batched_tokens=32))
    assert list(engine.managers) == (["global"] if layer_type == "full_attention" else ["sliding"])
    ps = prompts(6, seed=7)
    done = run(engine, {f"r{i}": (p, SamplingParams(max_tokens=30, **GREEDY)) for i, p in enumerate(ps)})
    for i, p in enumerate(ps):
        assert done[f"r{i}"].outputs[0].token_ids == generate(model, [p], 30)[0], f"request {i}"
    assert all_free(engine)


@torch.no_grad()
def test_prompt_logprobs_equal_a_whole_forward(model, tokenizer):
    """prompt_logprobs: each prompt token's logprob and top k under the model given the tokens before it, as
    one forward over the whole prompt gives them; computed in chunks (budget 8), past a cached copy of the
    prompt (prefix caching skips nothing scored), and for the first of n samples only."""
    prompt = tokenizer.encode("The cache holds factors of keys and values for every token. " * 3, add_bos=True)
    assert len(prompt) > 30
    logp = torch.log_softmax(model.forward_sequences(torch.tensor([prompt]))[0].float(), dim=-1)
    engine = make_engine(model, tokenizer, max_num_batched_tokens=8)
    engine.add_request("warm", prompt, SamplingParams(max_tokens=2, **GREEDY))  # its blocks stay cached
    while engine.has_unfinished():
        engine.step()
    engine.add_request("scored", prompt, SamplingParams(max_tokens=2, n=2, prompt_logprobs=3, **GREEDY))
    outs = []
    while engine.has_unfinished():
        outs += [out for out in engine.step() if out.request_id == "scored"]
    scored = outs[-1].prompt_logprobs
    assert len(scored) == len(prompt) - 1
    for position, (lp, top) in enumerate(scored):
        expected = logp[position]
        assert lp == pytest.approx(expected[prompt[position + 1]].item(), abs=1e-4), position
        values, ids = expected.topk(3)
        assert [t for t, _ in top] == ids.tolist(), position
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
    assert outs[-1].num_cached_tokens == 0  # the scored sample computed the whole prompt itself
    assert all_free(engine)


@torch.no_grad()
def test_prompt_logprobs_survive_preemption(model, tokenizer):
    """Sixteen scored prompts in a cache too small for them all: sequences are preempted and recomputed, and each
    prompt position is still scored once, as a whole forward scores it (the engine asserts the once)."""
    ps = prompts(16, seed=3)
    engine = make_engine(model, tokenizer, global_blocks=48, sliding_blocks=40, max_num_seqs=16,
                         max_num_batched_tokens=64)
    done = run(engine, {f"r{i}": (p, SamplingParams(max_tokens=24, prompt_logprobs=0, **GREEDY))
                        for i, p in enumerate(ps)})
    assert engine.num_preemptions > 0
    for i, p in enumerate(ps):
        logp = torch.log_softmax(model.forward_sequences(torch.tensor([p]))[0].float(), dim=-1)
        scored = done[f"r{i}"].prompt_logprobs
        assert [lp for lp, _ in scored] == pytest.approx([logp[j, p[j + 1]].item() for j in range(len(p) - 1)],
                                                          abs=1e-4), f"request {i}"
        assert all(top == [] for _, top in scored)
    assert all_free(engine)
