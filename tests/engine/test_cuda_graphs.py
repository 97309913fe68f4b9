"""Decode steps from CUDA graphs (server/engine/cuda_graphs.py).

What a graph replays is checked on any machine: the static buffers, the padding of a step up to the next
captured batch size, the pad block, full-width tables and the fixed split count. On a CPU those padded steps
run eagerly (Triton's interpreter), and must give the same greedy tokens as ordinary steps. On a GPU (marked
`gpu`) the graphs are captured and replayed for real.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the CPU runs the interpreter

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' installs it)")

from server.engine.cuda_graphs import graph_batch_sizes  # noqa: E402
from server.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from tpa_model.checkpoints.demo import build_demo  # noqa: E402
from tpa_model.checkpoints.loader import load_model  # noqa: E402
from tpa_model.sampling import SamplingParams  # noqa: E402
from tpa_model.tokenizers.gemma_tokenizer import GemmaTokenizer  # noqa: E402

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
# three prompts long enough to slide the demo model's window (16), with different output lengths so that the
# decode batch shrinks from 3 (padded to 4) to 2 and 1 as sequences finish
PROMPTS = [[2, 10, 11, 12], [2] + list(range(40, 61)), [2, 40]]
MAX_TOKENS = [5, 3, 2]  # after the prefill step: decode steps of 3, 2, 1 and 1 sequences


def test_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(64) == [1, 2, 4, *range(8, 65, 8)]
    assert graph_batch_sizes(1024) == [1, 2, 4, *range(8, 257, 8)]  # larger batches run eagerly


def greedy(model, tokenizer, cuda_graphs, block_size=4, num_blocks=64, cache_dtypes=("auto", None)):
    """The demo prompts' greedy tokens, and the engine (to look at what it ran)."""
    config = EngineConfig(block_size=block_size, num_blocks=num_blocks, attention_backend="triton",
                          cuda_graphs=cuda_graphs, max_num_seqs=6, kv_cache_dtype=cache_dtypes[0],
                          v_cache_dtype=cache_dtypes[1])
    engine = LLMEngine(model, tokenizer, config)
    runs = []
    if engine.runner.graphs is not None:
        real_run = engine.runner.graphs.run

        def counted(input_ids, meta):
            runs.append(meta.num_seqs)
            return real_run(input_ids, meta)

        engine.runner.graphs.run = counted
    for i, (prompt, n) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    done = {}
    while engine.has_unfinished():
        done |= {out.request_id: out.outputs[0].token_ids for out in engine.step() if out.finished}
    return done, engine, runs


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo")
    build_demo(path)
    return path, GemmaTokenizer.from_dir(path)


@pytest.mark.parametrize("ranks,cache_dtypes", [(None, ("auto", None)), (1, ("auto", None)), (1, ("int8", "int4"))],
                         ids=["standard", "factors k1 v1", "factors k1 v1, k int8 v int4"])
def test_padded_static_steps_give_the_same_tokens(demo, ranks, cache_dtypes):
    """Every decode step through the static buffers, padded to 4, 2 and 1 rows, equals eager steps; with a
    quantized cache too (the kernels read int8 keys and int4 values)."""
    path, tokenizer = demo
    model = load_model(path, k_rank=ranks, v_rank=ranks, device=DEVICE)
    eager, eager_engine, _ = greedy(model, tokenizer, cuda_graphs=False, cache_dtypes=cache_dtypes)
    replayed, engine, runs = greedy(model, tokenizer, cuda_graphs=True, cache_dtypes=cache_dtypes)
    assert eager_engine.runner.graphs is None
    assert replayed == eager and [len(replayed[str(i)]) for i in range(len(PROMPTS))] == MAX_TOKENS
    assert {3, 2, 1} <= set(runs)  # decode steps of 3, 2 and 1 sequences took the graph path
    captured = set(engine.runner.graphs.graphs)
    assert captured == (set(graph_batch_sizes(6)) if CUDA else set())  # a CPU captures nothing


def test_pad_block_is_outside_every_block_manager(demo):
    """The pad block is allocated past the blocks the managers hand out, in every pool, and the capacity
    report counts only the usable blocks."""
    path, tokenizer = demo
    model = load_model(path, device=DEVICE)
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=4, num_blocks=40, attention_backend="triton",
                                                      cuda_graphs=True, max_num_seqs=6))
    runner = engine.runner
    for pool in runner.kv.pools:
        assert engine.managers[pool.name].pool.num_blocks == 40 == runner.num_blocks[pool.name]
        assert runner.kv.num_blocks[pool.name] == 41
    assert runner.graphs.pad_blocks == [40] * len(runner.kv.pools)
    assert "40 blocks" in engine.capacity.format()


def test_prefill_steps_run_eagerly(demo):
    """A step with a prefill chunk never takes the graph path."""
    path, tokenizer = demo
    model = load_model(path, device=DEVICE)
    config = EngineConfig(block_size=4, num_blocks=64, attention_backend="triton", cuda_graphs=True,
                          max_num_seqs=2)
    engine = LLMEngine(model, tokenizer, config)
    assert engine.runner.graphs.sizes == [1, 2]
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=2, temperature=0.0))
    prefill = engine.runner.prepare(engine.scheduler.schedule())
    assert prefill.metadata.num_decodes == 0 and not engine.runner.graphs.can_run(prefill.metadata, None)


def test_graphs_need_the_triton_backend(demo):
    path, tokenizer = demo
    model = load_model(path, device=DEVICE)
    with pytest.raises(ValueError, match="need the triton attention backend"):
        LLMEngine(model, tokenizer, EngineConfig(num_blocks=16, attention_backend="reference", cuda_graphs=True))
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=16, attention_backend="reference"))
    assert engine.runner.graphs is None  # auto: no graphs, no error


def test_serve_has_enforce_eager():
    from server.cli import serve_parser

    assert serve_parser().parse_args(["--enforce-eager"]).enforce_eager
    assert not serve_parser().parse_args([]).enforce_eager


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cache_dtypes", [("auto", None), ("int8", "int4")], ids=["auto", "k int8 v int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_captured_graphs_replay_the_eager_steps(demo, dtype, cache_dtypes):
    """Captured and replayed for real. Each captured size's replay gives the logits of the same padded step
    run eagerly (bf16 and float32); in float32 the greedy tokens equal those of ordinary eager steps (in bf16 a
    padded batch may round a matmul differently and flip a near tie of the random model, so tokens are not
    compared there)."""
    path, tokenizer = demo
    model = load_model(path, k_rank=1, v_rank=1, dtype=dtype, device="cuda")
    eager, _, _ = greedy(model, tokenizer, cuda_graphs=False, block_size=16, cache_dtypes=cache_dtypes)
    replayed, engine, runs = greedy(model, tokenizer, cuda_graphs=None, block_size=16, cache_dtypes=cache_dtypes)
    graphs = engine.runner.graphs
    assert graphs is not None and sorted(graphs.graphs) == graphs.sizes and runs
    if dtype == torch.float32 and cache_dtypes[0] == "auto":  # a quantizer may round a last-bit difference apart
        assert replayed == eager
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    with torch.inference_mode():
        for size in graphs.sizes:  # the static buffers hold the last step's rows: a valid step of any size
            graphs.graphs[size].replay()
            from_graph = graphs.logits[:size].float().clone()
            direct = graphs.forward(size).float()
            scale = direct.abs().max().item()
            assert (from_graph - direct).abs().max().item() <= tolerance * scale, size
