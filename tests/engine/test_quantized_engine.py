"""The engine over an 8-bit or 4-bit KV cache: token for token what the contiguous path gives over the same cache
dtype, through chunked prefill and preemption; close to, and never the same as, a float32 cache; and the flags
that choose it."""

import pytest
import torch
from test_engine import GREEDY, all_free, make_engine, prompts, run

from server.cli import serve_parser
from server.engine.llm import LLM
from tpa_model.cache.quantization import KVCacheDtype
from tpa_model.checkpoints.loader import load_model
from tpa_model.sampling import SamplingParams

DTYPES = {"int8": ("int8", None), "fp8": ("fp8_e4m3", None), "k int8 v int4": ("int8", "int4")}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from tpa_model.checkpoints.demo import build_demo

    path = tmp_path_factory.mktemp("quantized_engine_model")
    build_demo(path)
    return path


@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("ranks", [(None, None), (1, 1)], ids=["standard", "factors"])
def test_batch_with_preemption_scores_as_the_contiguous_path(demo_dir, ranks, dtypes):
    """Each token the engine chose (chunked prefill, preemption, a batch) has the logprob that one whole forward
    over the same cache dtype gives it. Token-for-token equality is no test here: the keys of a batched step
    differ from a lone sequence's in the last float bit, and a quantizer rounds such a difference to a whole
    step now and then, which flips a near tie of the tiny random model's flat distributions."""
    from tpa_model.tokenizers.gemma_tokenizer import GemmaTokenizer

    model = load_model(demo_dir, k_rank=ranks[0], v_rank=ranks[1])
    model.kv_cache_dtype = KVCacheDtype.parse(*dtypes)
    ps = prompts(8, seed=1)
    engine = make_engine(model, GemmaTokenizer.from_dir(demo_dir), global_blocks=28, sliding_blocks=24,
                         max_num_seqs=8, max_num_batched_tokens=32, kv_cache_dtype=dtypes[0], v_cache_dtype=dtypes[1])
    done = run(engine, {f"r{i}": (p, SamplingParams(max_tokens=12, logprobs=0, **GREEDY)) for i, p in enumerate(ps)})
    assert engine.num_preemptions > 0
    for i, p in enumerate(ps):
        out = done[f"r{i}"].outputs[0]
        ids = torch.tensor([p + out.token_ids[:-1]])
        whole = torch.log_softmax(model(ids)[0, len(p) - 1 :].float(), -1)
        expected = whole.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(out.logprobs), expected, atol=0.02), f"request {i}"
    assert all_free(engine)


@pytest.mark.parametrize("dtypes,most", [(("int8", None), 1e-3), (("int8", "int4"), 3e-2), (("int4", None), 5e-2)])
def test_a_quantized_cache_is_close_to_float32_and_not_equal(demo_dir, dtypes, most):
    """Next-token distributions of a whole forward (every query reads the stored cache) against a float32 cache:
    a small KL, never zero (the cache really is stored in fewer bits)."""
    model = load_model(demo_dir)
    ids = torch.tensor([prompts(1, seed=2, lo=40, hi=41)[0]])
    exact = torch.log_softmax(model(ids).float(), -1)
    model.kv_cache_dtype = KVCacheDtype.parse(*dtypes)
    quantized = torch.log_softmax(model(ids).float(), -1)
    kl = (exact.exp() * (exact - quantized)).sum(-1).mean().item()
    assert 0 < kl < most


def test_llm_and_serve_flags_choose_the_cache_dtype(demo_dir):
    llm = LLM(demo_dir, kv_cache_dtype="fp8")
    assert {spec.k_cache_dtype for spec in llm.engine.runner.layout.specs} == {"fp8_e4m3"}
    assert {spec.v_cache_dtype for spec in llm.engine.runner.layout.specs} == {"fp8_e4m3"}  # values: as the keys
    out = llm.generate([[2, 20, 30, 40]], SamplingParams(max_tokens=4, **GREEDY))
    assert len(out[0].outputs[0].token_ids) == 4
    args = serve_parser().parse_args(["--kv-cache-dtype", "fp8", "--v-cache-dtype", "int4"])
    assert (args.kv_cache_dtype, args.v_cache_dtype) == ("fp8_e4m3", "int4")


def test_an_unknown_cache_dtype_is_one_line_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        serve_parser().parse_args(["--v-cache-dtype", "int3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("tpa-serve: error: argument --v-cache-dtype: unknown cache dtype 'int3'; choose one of auto, int8, "
                   "fp8_e4m3, int4, fp8")
