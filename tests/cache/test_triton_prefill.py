"""The Triton prefill kernel against the PyTorch reference backend's prefill, through real (shuffled) block tables.

Each case fills a paged cache with random factors (or plain keys and values), then runs one step's prefill
chunks (several sequences, cached prefixes of any length, chunks that are not multiples of the block size,
decodes before them in the batch) through both backends. Without CUDA the kernel runs in Triton's
interpreter (test_triton_backend, imported first, turns it on, or skips the module without triton) with
small head sizes; the group sizes are those of the real models. Tolerances as for decode: relative error
under 1e-5 in float32 and under 1e-2 in bfloat16 and float16.
"""

import pytest
import torch
from test_triton_backend import (
    CACHE_DTYPE_MIXES,
    DEVICE,
    PRESETS,
    QUANTIZED,
    SCALE,
    TOLERANCE,
    fill_random,
    needs_cuda,
    relative_error,
)

from tpa_model.cache.backends import attend
from tpa_model.cache.backends.reference import ReferenceBackend
from tpa_model.cache.backends.triton_decode import TritonBackend
from tpa_model.cache.backends.triton_prefill import prefill_attention
from tpa_model.cache.kv_cache import CacheSpec, KVCache
from tpa_model.cache.metadata import build_metadata

# (cached prefix, new tokens) per sequence: decodes first, then chunks with and without a prefix
STEP = [(6, 1), (30, 1), (0, 13), (17, 9), (40, 21)]


def prefill_case(H, G, d, ranks, step=STEP, window=None, block_size=5, dtype=torch.float32, device=DEVICE, seed=0,
                 images=None, cache_dtypes=("auto", "auto")):
    """A cache of random entries (keys and values stored as cache_dtypes say), the metadata of one step whose
    sequences hold `prefix` cached tokens and compute `new` more, and the step's queries [N, H, d]."""
    gen = torch.Generator().manual_seed(seed)
    spec = CacheSpec(G, d, min(ranks[0], G), min(ranks[1], G), window, dtype, *cache_dtypes)
    need = [-(-(prefix + new) // block_size) for prefix, new in step]
    kv = KVCache([spec], {"global" if window is None else "sliding": sum(need) + 3}, block_size, device)
    fill_random(kv.layers[0], gen)
    order = torch.randperm(sum(need) + 3, generator=gen).tolist()
    tables = []
    for n in need:
        tables.append(order[:n])
        order = order[n:]
    starts, lengths = [p for p, _ in step], [n for _, n in step]
    meta = build_metadata(kv, ReferenceBackend(), starts, lengths, [tables], [sum(lengths) - 1], images, device)
    q = torch.randn(sum(lengths), H, d, generator=gen).to(device, dtype)
    return kv, meta, q


def both(case, **config):
    """The prefill rows of the step through the reference and the kernel."""
    kv, meta, q = case
    rows = q[meta.query_start[meta.num_decodes]:]
    pool = meta.pools[0]
    expected = ReferenceBackend().prefill(rows, kv.layers[0], pool, meta, SCALE)
    out = prefill_attention(rows, kv.layers[0], pool, meta, SCALE, **config)
    assert out.dtype == q.dtype and out.shape == rows.shape
    return out.float(), expected.float()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("ranks", [(1, 1), (2, 3), (4, 4), (1000, 1000)], ids=["k1v1", "k2v3", "k4v4", "plain"])
def test_prefill_equals_reference(preset, ranks):
    H, G, _ = PRESETS[preset]
    out, expected = both(prefill_case(H, G, 16, ranks))
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("ranks", [(1, 3), (3, 1), (2, 2), (3, 3)], ids=["k factored", "v factored", "both", "plain"])
@pytest.mark.parametrize("window", [4, 9, 16])
def test_window_equals_reference(ranks, window):
    """Sliding-window layers: the table starts at the window of the chunk's first token; later queries of
    the chunk see fewer of those keys."""
    out, expected = both(prefill_case(9, 3, 16, ranks, window=window, seed=window))
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("rows, block_n", [(16, 16), (32, 16), (64, 32)])
def test_tile_sizes(rows, block_n):
    """Query tiles of one token's heads or many, key tiles across blocks; smollm2's 3 heads per group leave
    padding rows in every tile."""
    out, expected = both(prefill_case(9, 3, 64, (2, 2), block_size=4), rows=rows, block_n=block_n)
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ranks", [(2, 1), (4, 4)], ids=["factors", "plain"])
def test_half_precision_equals_reference(dtype, ranks):
    out, expected = both(prefill_case(8, 4, 32, ranks, window=20, dtype=dtype))
    assert relative_error(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("cache_dtypes, ranks, d, window, dtype", QUANTIZED)
def test_quantized_cache_equals_reference(cache_dtypes, ranks, d, window, dtype):
    """The kernel reads the stored int8, fp8 or int4 rows and scales and dequantizes them in registers, before
    rebuilding keys and values from factors."""
    case = prefill_case(9, 3, d, ranks, window=window, dtype=dtype, cache_dtypes=cache_dtypes)
    out, expected = both(case)
    assert relative_error(out, expected) < TOLERANCE[dtype]


def test_real_head_dim():
    """Gemma 3's head_dim, 256, with 12b's group size."""
    out, expected = both(prefill_case(4, 2, 256, (1, 2), step=[(0, 7), (19, 12)]))
    assert relative_error(out, expected) < 1e-5


def test_image_tokens_see_their_whole_image():
    """An image's soft tokens attend to every token of the image (their limit is its last position), later
    tokens causally; the kernel follows the limits, not the positions."""
    images = [[], [], [(2, 8)], [(20, 24)], []]
    out, expected = both(prefill_case(8, 4, 16, (2, 2), images=images))
    assert relative_error(out, expected) < 1e-5
    _, meta, _ = prefill_case(8, 4, 16, (2, 2), images=images)
    assert (meta.limits > meta.positions).any()


def test_blocks_outside_the_visible_table_are_never_read():
    """A sliding pool's dropped blocks and every other sequence's blocks are poisoned with NaN: the outputs
    stay finite and equal the reference."""
    kv, meta, q = prefill_case(8, 4, 16, (2, 2), step=[(30, 6)], window=6, block_size=4)
    table = meta.pools[0].block_tables[0].tolist()
    for t in kv.layers[0].tensors():
        t.view(-1, 4, *t.shape[1:])[[b for b in range(t.shape[0] // 4) if b not in table]] = float("nan")
    out, expected = both((kv, meta, q))
    assert torch.isfinite(out).all() and relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("cache_dtypes", [("auto", "auto"), ("int8", "int4")], ids=["auto", "k-int8-v-int4"])
def test_mixed_step_through_attend(cache_dtypes):
    """A whole step through `attend` (new entries written, quantized where the cache is, decodes and chunks
    attended) with either backend."""
    spec = CacheSpec(3, 16, 2, 1, None, torch.float32, *cache_dtypes)
    starts, lengths = [10, 25, 0, 4], [1, 1, 9, 6]
    tables = [list(range(0, 3)), list(range(3, 10)), [10, 11, 12], [13, 14, 15]]
    outs = []
    for backend in (ReferenceBackend(), TritonBackend(block_t=16, split_tokens=16)):
        gen = torch.Generator().manual_seed(3)

        def rand(*shape, gen=gen):
            return torch.randn(*shape, generator=gen).to(DEVICE)

        kv = KVCache([spec], {"global": 40}, 4, DEVICE)
        warm = build_metadata(kv, backend, [0, 0, 0], [10, 25, 4], [[tables[0], tables[1], tables[3]]], [],
                              device=DEVICE)
        backend.write(kv.layers[0], warm.pools[0].slot_mapping, (rand(39, 2, 3), rand(39, 2, 16)),
                      (rand(39, 1, 3), rand(39, 1, 16)))
        meta = build_metadata(kv, backend, starts, lengths, [tables], [0, 1, 10, 16], device=DEVICE)
        new_k, new_v = (rand(17, 2, 3), rand(17, 2, 16)), (rand(17, 1, 3), rand(17, 1, 16))
        outs.append(attend(0, rand(17, 6, 16), new_k, new_v, meta, SCALE))
    assert relative_error(outs[1], outs[0]) < 1e-5


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ranks", [(1, 1), (2, 3), (1000, 1000)], ids=["k1v1", "k2v3", "plain"])
def test_gpu_real_sizes(preset, dtype, ranks):
    H, G, d = PRESETS[preset]
    step = [(100, 1), (0, 700), (1500, 512), (4099, 37)]
    for window in (None, 1024):
        case = prefill_case(H, G, d, ranks, step=step, window=window, block_size=16, dtype=dtype, device="cuda")
        out, expected = both(case)
        assert relative_error(out, expected) < TOLERANCE[dtype], f"window {window}"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("preset", ["gemma3-12b"])  # the 27b shape: by the bf16 tests and the benchmark
@pytest.mark.parametrize("cache_dtypes", CACHE_DTYPE_MIXES, ids="-".join)
@pytest.mark.parametrize("ranks", [(1, 1), (2, 3), (1000, 1000)], ids=["k1v1", "k2v3", "plain"])
def test_gpu_quantized_real_sizes(preset, cache_dtypes, ranks):
    """Quantized caches at real sizes, bf16: the kernel reads the stored bytes as the reference does."""
    H, G, d = PRESETS[preset]
    step = [(100, 1), (0, 700), (1500, 512), (4099, 37)]
    for window in (None, 1024):
        case = prefill_case(H, G, d, ranks, step=step, window=window, block_size=16, dtype=torch.bfloat16,
                            device="cuda", cache_dtypes=cache_dtypes)
        out, expected = both(case)
        assert relative_error(out, expected) < TOLERANCE[torch.bfloat16], f"window {window}"
