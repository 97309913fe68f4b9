"""llama.cpp's tensor types, and the dequantization of its common block formats in torch.

A quantized row is a run of blocks: each block of `block_size` weights is `type_size` bytes of float16 scales
and packed integers, laid out as ggml-quants.c's `dequantize_row_*` reads them. Here every block of a tensor
is unpacked at once with tensor operations, in the float32 arithmetic of those functions (and of the `gguf`
package's numpy versions, which the tests hold these to exactly). Formats not written here (the IQ, TQ and
FP4 families) go to the `gguf` package where it is installed.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

import numpy as np
import torch


class GGMLType(IntEnum):
    """ggml's `ggml_type` ids, as GGUF files name their tensors' types."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


T = GGMLType
# (weights per block, bytes per block)
BLOCK_SIZES: dict[GGMLType, tuple[int, int]] = {
    T.F32: (1, 4), T.F16: (1, 2), T.BF16: (1, 2), T.F64: (1, 8),
    T.I8: (1, 1), T.I16: (1, 2), T.I32: (1, 4), T.I64: (1, 8),
    T.Q4_0: (32, 18), T.Q4_1: (32, 20), T.Q5_0: (32, 22), T.Q5_1: (32, 24), T.Q8_0: (32, 34), T.Q8_1: (32, 40),
    T.Q2_K: (256, 84), T.Q3_K: (256, 110), T.Q4_K: (256, 144), T.Q5_K: (256, 176), T.Q6_K: (256, 210),
    T.Q8_K: (256, 292),
    T.IQ2_XXS: (256, 66), T.IQ2_XS: (256, 74), T.IQ3_XXS: (256, 98), T.IQ1_S: (256, 50), T.IQ4_NL: (32, 18),
    T.IQ3_S: (256, 110), T.IQ2_S: (256, 82), T.IQ4_XS: (256, 136), T.IQ1_M: (256, 56),
    T.TQ1_0: (256, 54), T.TQ2_0: (256, 66), T.MXFP4: (32, 17), T.NVFP4: (64, 36), T.Q1_0: (128, 18),
}
# types whose data is plain numbers of this numpy type (the others are bytes of blocks)
PLAIN_TYPES = {T.F32: np.float32, T.F16: np.float16, T.F64: np.float64,
               T.I8: np.int8, T.I16: np.int16, T.I32: np.int32, T.I64: np.int64}

CHUNK_BLOCKS = 1 << 14  # blocks unpacked per pass: bounds the integer temporaries of a large matrix


def _half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of each block, as float32 [blocks, 1]."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _shifted(packed: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """(packed >> s) & mask for each shift s, on a new axis before the last: [..., n] -> [..., len(shifts), n]."""
    shift = torch.tensor(shifts, dtype=torch.uint8).view(len(shifts), 1)
    return (packed.unsqueeze(-2) >> shift) & mask


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Low nibbles of a block's bytes, then high nibbles: [blocks, n] -> [blocks, 2n]."""
    return _shifted(packed, [0, 4], 0xF).flatten(-2)


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """The bits of little-endian bytes, lowest first: [blocks, n] -> [blocks, 8n]."""
    return _shifted(packed, list(range(8)), 1).transpose(-1, -2).flatten(-2)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * (_nibbles(b[:, 2:18]).view(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * _nibbles(b[:, 4:20]).float() + _half(b, 2)


def _q5(b: torch.Tensor, high_at: int) -> torch.Tensor:
    """Q5_0 and Q5_1's 5-bit values: the nibbles, with a fifth bit per weight in 4 bytes at `high_at`."""
    return _nibbles(b[:, high_at + 4:high_at + 20]) | (_bits(b[:, high_at:high_at + 4]) << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * (_q5(b, 2).view(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * _q5(b, 4).float() + _half(b, 2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * b[:, 2:].view(torch.int8).float()


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    """16 groups of 16 two-bit values, each group with a 4-bit scale and a 4-bit min."""
    n = len(b)
    scales = b[:, :16]
    q = _shifted(b[:, 16:80].view(n, 2, 32), [0, 2, 4, 6], 3).view(n, 16, 16).float()
    scale = (_half(b, 80) * (scales & 0xF).float()).view(n, 16, 1)
    low = (_half(b, 82) * (scales >> 4).float()).view(n, 16, 1)
    return (scale * q - low).view(n, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    """16 groups of 16 three-bit values (two low bits packed, the third in a mask) with 6-bit scales."""
    n = len(b)
    packed = b[:, 96:108]
    low = _nibbles(packed[:, :8])  # scale i's low 4 bits: byte i's low nibble, then bytes 0-7's high nibbles
    high = _shifted(packed[:, 8:], [0, 2, 4, 6], 3).flatten(-2)  # its top 2 bits
    scales = ((low | (high << 4)).view(torch.int8) - 32).float()
    scale = (_half(b, 108) * scales).view(n, 16, 1)
    q = _shifted(b[:, 32:96].view(n, 2, 32), [0, 2, 4, 6], 3).view(torch.int8)  # [n, half, shift, 32]
    unset = _shifted(b[:, :32], list(range(8)), 1).view(n, 2, 4, 32) ^ 1  # bit half*4 + shift of hmask
    q = (q - (unset << 2).view(torch.int8)).view(n, 16, 16).float()
    return (scale * q).view(n, 256)


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K and Q5_K's eight 6-bit scales and mins, packed in 12 bytes (ggml's get_scale_min_k4)."""
    first, second, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([first & 63, (rest & 0xF) | ((first >> 6) << 4)], dim=1)
    mins = torch.cat([second & 63, (rest >> 4) | ((second >> 6) << 4)], dim=1)
    return scales.float(), mins.float()


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """8 groups of 32 values q [n, 8, 32], each scaled and shifted by its 6-bit scale and min."""
    n = len(b)
    scales, mins = _k_scales_mins(b[:, 4:16])
    scale = (_half(b, 0) * scales).view(n, 8, 1)
    low = (_half(b, 2) * mins).view(n, 8, 1)
    return (scale * q.float() - low).view(n, 256)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = len(b)
    return _k_affine(b, _shifted(b[:, 16:144].view(n, 4, 32), [0, 4], 0xF).view(n, 8, 32))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = len(b)
    low = _shifted(b[:, 48:176].view(n, 4, 32), [0, 4], 0xF).view(n, 8, 32)
    high = _shifted(b[:, 16:48], list(range(8)), 1)  # group g's fifth bits: bit g of each of 32 bytes
    return _k_affine(b, low | (high << 4))


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    """Two halves of 128 six-bit values: 4 low bits in 64 bytes, 2 high bits in 32, 8 signed 8-bit scales."""
    n = len(b)
    low = _shifted(b[:, :128].view(n, 2, 64), [0, 4], 0xF).view(n, 2, 4, 32)
    high = _shifted(b[:, 128:192].view(n, 2, 32), [0, 2, 4, 6], 3)
    q = ((low | (high << 4)).view(torch.int8) - 32).view(n, 16, 16).float()
    scale = (_half(b, 208) * b[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    return (scale * q).view(n, 256)


DEQUANTIZERS: dict[GGMLType, Callable[[torch.Tensor], torch.Tensor]] = {
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}


def dequantize(data: np.ndarray, kind: GGMLType) -> torch.Tensor:
    """A tensor's data as the reader holds it (numbers, or [..., bytes per row] of blocks) -> float32 in torch
    order, a copy. Raises NotImplementedError for a type neither this module nor the gguf package unpacks."""
    if kind in (T.F32, T.F16):
        return torch.from_numpy(np.array(data, dtype=np.float32))
    if kind == T.BF16:  # the top half of a float32's bits
        return torch.from_numpy(np.array(data, dtype=np.uint8)).view(torch.bfloat16).float()
    block_size, type_size = BLOCK_SIZES[kind]
    shape = data.shape if kind in PLAIN_TYPES else (*data.shape[:-1], data.shape[-1] // type_size * block_size)
    if kind not in DEQUANTIZERS:
        return _dequantize_with_gguf_package(data, kind).view(shape)
    blocks = torch.from_numpy(np.array(data, dtype=np.uint8)).view(-1, type_size)
    out = torch.empty(len(blocks), block_size)
    unpack = DEQUANTIZERS[kind]
    for start in range(0, len(blocks), CHUNK_BLOCKS):
        out[start:start + CHUNK_BLOCKS] = unpack(blocks[start:start + CHUNK_BLOCKS])
    return out.view(shape)


def _dequantize_with_gguf_package(data: np.ndarray, kind: GGMLType) -> torch.Tensor:
    try:
        import gguf
    except ImportError:
        raise NotImplementedError("which only the gguf package dequantizes (pip install gguf)") from None
    try:
        values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(int(kind)))
    except NotImplementedError:
        raise NotImplementedError(f"which gguf {_gguf_version()} cannot dequantize") from None
    return torch.from_numpy(np.array(values, dtype=np.float32))


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"
