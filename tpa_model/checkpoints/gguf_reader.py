"""A GGUF file's header read in one pass: its metadata as Python values, its tensors as views of a memory map.

The `gguf` package's reader builds a numpy view for every element of every metadata array, so opening Gemma 3
(a 262,144-token vocabulary: tokens, scores and types) took 17 s on a 2-core CPU; here a numeric array is one
`frombuffer` and a string one `unpack_from` and one slice, which takes a fraction of a second. The layout
follows the GGUF specification (versions 2 and 3, little-endian); tensor types and their block sizes are
`gguf_quants`'.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .gguf_quants import BLOCK_SIZES, PLAIN_TYPES, GGMLType

# GGUF metadata value types (the specification's gguf_metadata_value_type)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
NUMERIC = {UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4", FLOAT32: "<f4",
           BOOL: "?", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8"}
DEFAULT_ALIGNMENT = 32
U32, U64 = struct.Struct("<I"), struct.Struct("<Q")


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF file this reader can read (truncated, corrupt, big-endian, version 1)."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    tensor_type: GGMLType
    shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    data: np.ndarray  # read-only view: numbers shaped in torch order, or [..., bytes per row] of quantized blocks


class GGUFFile:
    """`fields`: metadata key -> value (float32 scalars as the shortest decimal that rounds to them, arrays as
    lists); `tensors`: in file order. The memory map lives as long as any tensor's data does."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        magic, version = self._bytes(4), self._unpack(U32)
        if magic != b"GGUF":
            raise GGUFFormatError(f"not a GGUF file (it starts with {magic!r})")
        if version & 0xFFFF == 0:
            raise GGUFFormatError("a big-endian GGUF file, which is not supported")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} is not supported (2 and 3 are)")
        tensor_count, field_count = self._unpack(U64), self._unpack(U64)
        self.fields: dict[str, Any] = {}
        for _ in range(field_count):
            key = self._string()
            self.fields[key] = self._value(self._unpack(U32))
        infos = [self._tensor_info() for _ in range(tensor_count)]
        alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise GGUFFormatError(f"general.alignment is {alignment!r}")
        start = -(-self._pos // alignment) * alignment
        self.tensors: list[GGUFTensorInfo] = []
        names = set()
        for name, shape, kind, offset in infos:
            if name in names:
                raise GGUFFormatError(f"tensor {name!r} appears twice")
            names.add(name)
            self.tensors.append(GGUFTensorInfo(name, kind, shape, self._tensor_data(kind, shape, start + offset)))

    # -- the header's pieces --

    def _bytes(self, n: int) -> bytes:
        end = self._pos + n
        if n < 0 or end > len(self._map):
            raise GGUFFormatError(f"the file ends at byte {len(self._map)}, inside a value at byte {self._pos}")
        data, self._pos = self._map[self._pos:end], end
        return data

    def _unpack(self, layout: struct.Struct) -> int:
        if self._pos + layout.size > len(self._map):
            raise GGUFFormatError(f"the file ends at byte {len(self._map)}, inside a value at byte {self._pos}")
        (value,) = layout.unpack_from(self._map, self._pos)
        self._pos += layout.size
        return value

    def _string(self) -> str:
        return self._bytes(self._unpack(U64)).decode("utf-8")

    def _value(self, kind: int) -> Any:
        if kind == STRING:
            return self._string()
        if kind == ARRAY:
            item, count = self._unpack(U32), self._unpack(U64)
            if item in (STRING, ARRAY):  # an array's items are arrays with their own item type and count
                return [self._value(item) for _ in range(count)]
            return self._numbers(item, count).tolist()
        value = self._numbers(kind, 1)[0].item()
        return float(str(np.float32(value))) if kind == FLOAT32 else value  # 1e-06, not 9.999999974752427e-07

    def _numbers(self, kind: int, count: int) -> np.ndarray:
        if kind not in NUMERIC:
            raise GGUFFormatError(f"unknown metadata value type {kind} at byte {self._pos}")
        dtype = np.dtype(NUMERIC[kind])
        return np.frombuffer(self._bytes(count * dtype.itemsize), dtype=dtype)

    def _tensor_info(self) -> tuple[str, tuple[int, ...], GGMLType, int]:
        name = self._string()
        dims = self._unpack(U32)
        shape = tuple(int(d) for d in self._numbers(UINT64, dims)) if dims else ()
        kind_id, offset = self._unpack(U32), self._unpack(U64)
        try:
            kind = GGMLType(kind_id)
        except ValueError:
            raise GGUFFormatError(f"tensor {name!r} has unknown type {kind_id}") from None
        return name, shape, kind, offset

    def _tensor_data(self, kind: GGMLType, shape: tuple[int, ...], offset: int) -> np.ndarray:
        torch_order = tuple(reversed(shape))
        elements = int(np.prod(shape, dtype=np.int64))
        if kind in PLAIN_TYPES:
            dtype, count = np.dtype(PLAIN_TYPES[kind]), elements
        else:  # [..., bytes per row] of blocks
            block, block_bytes = BLOCK_SIZES[kind]
            if not torch_order or torch_order[-1] % block:
                raise GGUFFormatError(f"a {kind.name} tensor of shape {shape}: its rows do not split into blocks "
                                      f"of {block}")
            dtype, count = np.dtype(np.uint8), elements // block * block_bytes
            torch_order = (*torch_order[:-1], torch_order[-1] // block * block_bytes)
        if offset + count * dtype.itemsize > len(self._map):
            raise GGUFFormatError(f"tensor data at byte {offset} runs past the end of the file ({len(self._map)})")
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=offset).reshape(torch_order)
