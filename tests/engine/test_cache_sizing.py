"""Cache sizing: on CUDA, --gpu-memory-utilization of total memory, less the weights and a warm-up step's
activation peak, goes to the KV cache. The arithmetic and the warm-up forward run on the CPU; the memory
measurement runs on a GPU (marked `gpu`, skipped with 'needs CUDA' elsewhere)."""

import gc
import logging
import weakref

import pytest
import torch

from server.engine import model_runner
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.model_runner import (
    CPU_CACHE_BYTES,
    ModelRunner,
    cache_budget,
    warmup_cache_bytes,
    warmup_step,
)
from tpa_model.cache.backends import make_backend
from tpa_model.cache.capacity import tpa_layout
from tpa_model.checkpoints.demo import build_demo
from tpa_model.checkpoints.loader import load_model
from tpa_model.tokenizers.gemma_tokenizer import GemmaTokenizer

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
GiB = 2**30


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sizing_model")
    build_demo(path)  # 6 layers (5 sliding, window 16): two cache pools
    return path


def test_budget_is_utilization_of_total_less_weights_and_activations():
    assert cache_budget(80 * GiB, 10 * GiB, 2 * GiB, 0.9) == int(0.9 * 80 * GiB) - 12 * GiB
    assert cache_budget(1000, 100, 0, 1.0) == 900


@pytest.mark.parametrize("in_use, peak", [(70 * GiB, 2 * GiB), (72 * GiB, 0), (60 * GiB, 20 * GiB)])
def test_no_room_for_the_cache_is_refused_with_the_numbers(in_use, peak):
    with pytest.raises(ValueError) as info:
        cache_budget(80 * GiB, in_use, peak, 0.9)
    msg = str(info.value)
    assert "--gpu-memory-utilization 0.9" in msg and "80.00 GiB" in msg
    assert f"{in_use / GiB:.2f} GiB is in use" in msg and f"peak at {peak / GiB:.2f} GiB" in msg


@pytest.mark.parametrize("ranks", [{}, {"k_rank": 1, "v_rank": 1}])
@pytest.mark.parametrize("tokens, seqs", [(64, 8), (37, 5), (4, 16), (1, 1)])
def test_warmup_runs_the_largest_step_and_frees_its_cache(demo_dir, ranks, tokens, seqs, monkeypatch):
    model = load_model(demo_dir, **ranks)
    layout = tpa_layout(model.config, model.dtype, 4)
    caches, sizes = [], []

    class Tracked(model_runner.KVCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            caches.append(weakref.ref(self))
            sizes.append(self.total_bytes())

    monkeypatch.setattr(model_runner, "KVCache", Tracked)
    shape = warmup_step(model, layout, make_backend("reference", model.device), 4, tokens, seqs)
    assert shape == (min(tokens, seqs), model.config.vocab_size)
    # what step_peak_bytes takes off the measured peak is the cache the step allocated
    assert sizes == [warmup_cache_bytes(layout, 4, tokens, seqs)]
    gc.collect()
    assert len(caches) == 1 and caches[0]() is None  # the throwaway cache is gone


def test_cpu_default_stays_one_gib_and_cache_memory_overrides(demo_dir):
    model = load_model(demo_dir)
    runner = ModelRunner(model, 4, 64, 4, 32)
    assert runner.kv.total_bytes() <= CPU_CACHE_BYTES
    small = ModelRunner(model, 4, 64, 4, 32, cache_bytes=1 << 20)
    assert small.kv.total_bytes() <= 1 << 20


@pytest.mark.gpu
@needs_cuda
def test_cuda_cache_is_sized_from_the_warmup(demo_dir, caplog):
    model = load_model(demo_dir, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    loaded = total - free
    utilization = (loaded + 1 * GiB) / total  # about 1 GiB for activations and cache together
    tokenizer = GemmaTokenizer.from_dir(demo_dir)
    with caplog.at_level(logging.INFO, logger="gemma_tpa.engine"):
        engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=16, max_num_batched_tokens=512,
                                                          max_model_len=256, gpu_memory_utilization=utilization))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("GPU memory:"))
    budget = float(line.rsplit("; ", 1)[1].split()[0]) * GiB
    in_use = float(line.split("usable; ")[1].split()[0]) * GiB  # after the warm-ups: with cuBLAS and kernels
    peak = float(line.split("peak at ")[1].split()[0]) * GiB
    graphs = float(line.split("decode graphs hold ")[1].split()[0]) * GiB
    assert engine.runner.graphs is not None and 0 < graphs <= peak  # a decode step is one of the steps measured
    assert loaded - 0.01 * GiB <= in_use < loaded + 0.5 * GiB
    assert 0 < peak < 1 * GiB and abs(budget - (utilization * total - in_use - peak - graphs)) < 0.02 * GiB
    assert engine.runner.kv.total_bytes() <= budget + 0.01 * GiB
    # the engine still runs the largest step inside the budget after the cache is allocated (the warm-up's own
    # throwaway cache aside)
    allocated = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    layout = engine.runner.layout
    warmup_step(model, layout, engine.runner.backend, 16, 512, 16)
    step = torch.cuda.max_memory_allocated() - allocated - warmup_cache_bytes(layout, 16, 512, 16)
    assert 0 < step <= peak + 0.01 * GiB
    with pytest.raises(ValueError, match="no GPU memory left for the KV cache"):
        LLMEngine(model, tokenizer, EngineConfig(gpu_memory_utilization=in_use / total * 0.5))
