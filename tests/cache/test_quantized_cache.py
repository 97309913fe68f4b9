"""8-bit and 4-bit caches: the quantizers' error bounds, the bytes a layer holds (scales included), and the
reference backend over a quantized paged cache against dense attention on the dequantized keys and values."""

import pytest
import torch
from test_backends import D_HEAD, G, dense_reference, mixed_step

from tpa_model.cache.backends.reference import ReferenceBackend
from tpa_model.cache.kv_cache import CacheSpec, LayerKV
from tpa_model.cache.quantization import (
    KVCacheDtype,
    dequantize,
    is_rotated,
    pack_int4,
    parse_cache_dtype,
    quantize,
    rotation,
    unpack_int4,
)

KINDS = ["int8", "fp8_e4m3", "int4"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_number_within_the_quantizer_bound(kind):
    """int8 and int4 round to the nearest step of their row's (group's) scale: at most half a step off. fp8
    e4m3 keeps 3 mantissa bits: at most 2^-4 of the number off (2^-9 of the scale near zero)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 64, generator=gen) * torch.logspace(-3, 2, 64)  # rows of very different magnitudes
    data, scale = quantize(x, kind)
    y = dequantize(data, scale, kind, torch.float32)
    groups = scale.shape[-1]
    step = scale.float().repeat_interleave(64 // groups, dim=-1)
    if kind == "fp8_e4m3":
        bound = x.abs() * 2**-4 + step * 2**-9
    else:
        bound = step / 2
    assert ((y - x).abs() <= bound * 1.0001 + 1e-7).all()
    assert data.shape[-1] == (32 if kind == "int4" else 64)
    assert groups == (2 if kind == "int4" else 1)


def test_all_zero_rows_and_int4_nibbles_round_trip():
    zeros = torch.zeros(2, 64)
    for kind in KINDS:
        assert dequantize(*quantize(zeros, kind), kind, torch.float32).eq(0).all()
    q = torch.arange(-7, 8).float().repeat(2)[:-2].view(1, 28)
    assert torch.equal(unpack_int4(pack_int4(q.view(1, 1, 28))), q)


def test_cache_dtype_names():
    assert parse_cache_dtype("fp8") == "fp8_e4m3"
    assert KVCacheDtype.parse("int8") == KVCacheDtype("int8", "int8")
    assert KVCacheDtype.parse("int8", "int4") == KVCacheDtype("int8", "int4")
    assert KVCacheDtype.parse(None, None) == KVCacheDtype("auto", "auto")
    with pytest.raises(ValueError, match="unknown cache dtype 'int3'; choose one of auto, int8, fp8_e4m3, int4"):
        parse_cache_dtype("int3")


@pytest.mark.parametrize("k,v,per_token", [
    ("auto", "auto", 2 * 3 * 64 * 2),  # bf16 K and V: G d numbers each
    ("int8", "int8", 2 * 3 * (64 + 2)),  # a byte per number and a float16 scale per token and head
    ("int8", "int4", 3 * (64 + 2) + 3 * (32 + 2 * 2)),  # int4: half a byte per number, a scale per 32
    ("fp8_e4m3", "fp8_e4m3", 2 * 3 * (64 + 2)),
])
def test_a_layer_holds_its_scales_in_its_slots(k, v, per_token):
    spec = CacheSpec(3, 64, 3, 3, None, torch.bfloat16, k, v)
    assert LayerKV(spec, 10, "meta").nbytes == 10 * per_token


def test_factored_parts_quantize_the_token_factors_only():
    """Head factors (R x G numbers per token) stay in the model's dtype; token factors carry the scales."""
    spec = CacheSpec(3, 64, 1, 2, None, torch.bfloat16, "int8", "int4")
    layer = LayerKV(spec, 10, "meta")
    assert [t.dtype for t in layer.k] == [torch.bfloat16, torch.int8]
    assert [tuple(t.shape) for t in layer.v] == [(10, 2, 3), (10, 2, 32)]
    assert tuple(layer.k_scale.shape) == (10, 1, 1) and tuple(layer.v_scale.shape) == (10, 2, 2)
    assert layer.nbytes == 10 * ((1 * 3 * 2 + 64 + 2) + (2 * 3 * 2 + 2 * 32 + 2 * 2 * 2))
    assert spec.layout == "factors k1 v2 (k int8, v int4)"


def stored_as(entries, spec: CacheSpec):
    """(dense K, dense V) as a quantized cache gives them back: each stored row (a plain token's head, or a token
    factor) quantized and dequantized."""
    k, v, _, _ = entries

    def readback(parts, kind, factored):
        rows = parts[-1]
        if is_rotated(kind):  # int4 rows are stored rotated; attention's results are those of the rows turned back
            turn = rotation(rows.shape[-1], "cpu", torch.float32)
            rows = dequantize(*quantize(rows @ turn, kind), kind, torch.float32) @ turn.T
        elif kind != "auto":
            rows = dequantize(*quantize(rows, kind), kind, torch.float32)
        if factored:
            return torch.einsum("trg,trd->tgd", parts[0], rows)
        return rows

    return readback(k, spec.k_cache_dtype, spec.k_factored), readback(v, spec.v_cache_dtype, spec.v_factored)


SPECS = {"standard": (G, G), "factors": (2, 1), "k plain, v factored": (G, 3)}
DTYPES = {"int8": ("int8", "int8"), "fp8": ("fp8_e4m3", "fp8_e4m3"), "int4": ("int4", "int4"),
          "k int8 v int4": ("int8", "int4")}


@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("ranks", SPECS.values(), ids=SPECS.keys())
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("tiles", ["one tile", "one block per tile"])
def test_quantized_step_equals_dense_attention_on_what_was_stored(dtypes, ranks, window, tiles):
    """Decodes and prefill chunks (one over a cached prefix) read the quantized cache tile by tile; the result is
    dense attention over the dequantized rows, to float32 rounding."""
    gen = torch.Generator().manual_seed(3)
    spec = CacheSpec(G, D_HEAD, *ranks, window, torch.float32, *dtypes)
    backend = ReferenceBackend() if tiles == "one tile" else ReferenceBackend(tile_bytes=1, tile_scores=1)
    steps = [(12, 1), (21, 1), (0, 7), (9, 10)]
    meta, q, out, entries = mixed_step(spec, backend, steps, gen)
    for i in range(len(steps)):
        lo, hi = meta.query_start[i], meta.query_start[i + 1]
        k_read, v_read = stored_as(entries[i], spec)
        expected = dense_reference(q[lo:hi], k_read, v_read, meta.positions[lo:hi], meta.limits[lo:hi], window)
        assert (out[lo:hi].double() - expected).abs().max() <= 1e-5, f"sequence {i}"
        exact = dense_reference(q[lo:hi], entries[i][2], entries[i][3], meta.positions[lo:hi], meta.limits[lo:hi],
                                window)
        assert (out[lo:hi].double() - exact).abs().max() > 1e-6, "the cache must really be stored quantized"


@pytest.mark.parametrize("width", [64, 256, 48])
def test_the_int4_rotation_is_orthogonal_and_spreads_a_large_channel(width):
    """q . k is unchanged by the rotation; keys whose one channel is 50x the rest lose less in int4 once rotated
    (a group's scale no longer follows that one channel): measured 2.0x, 1.65x and 1.13x less here."""
    turn = rotation(width, "cpu", torch.float64)
    assert torch.allclose(turn @ turn.T, torch.eye(width, dtype=torch.float64), atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(64, width, generator=gen)
    keys[:, 3] *= 50
    plain = dequantize(*quantize(keys, "int4"), "int4", torch.float32)
    turned = dequantize(*quantize(keys @ turn.float(), "int4"), "int4", torch.float32) @ turn.float().T
    assert (turned - keys).norm() < 0.9 * (plain - keys).norm()


def test_tables_and_rotations_made_in_inference_mode_serve_autograd_later():
    """The engine runs under inference mode and builds the cached rotation and byte tables there; a forward that
    autograd records afterwards (healing, evaluation) must still use them."""
    with torch.inference_mode():
        turn = rotation(96, "cpu", torch.float32)
        table_read = dequantize(*quantize(torch.randn(2, 64), "fp8_e4m3"), "fp8_e4m3", torch.float32)
    assert not turn.is_inference() and table_read.is_inference()
    x = torch.randn(3, 96, requires_grad=True)
    (x @ turn).sum().backward()
    assert torch.allclose(x.grad, turn.sum(1).expand(3, 96))
