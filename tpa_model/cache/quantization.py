"""Cache storage in 8 and 4 bits: what a stored row is, and how it is written and read back.

A cache dtype applies to one part (keys or values) of every layer:
    auto       the model's dtype, as before
    int8       symmetric int8, one scale per row: x ~ q * s, s = max|x| / 127
    fp8_e4m3   float8 e4m3 (stored as its bytes), one scale per row: s = max|x| / 448, so a row's largest
               number lands on e4m3's largest; never an uncalibrated scale of 1
    int4       symmetric 4-bit, one scale per group of INT4_GROUP numbers: s = max|x| / 7, q + 8 in a nibble,
               two numbers per byte (element 2i in the low nibble, 2i + 1 in the high one)
A row is what the cache holds contiguously along the head dimension: one token's keys of one kv head (plain
parts) or one token factor of one rank (factored parts). Head factors (R x G numbers per token) stay in the
model's dtype: they are a few bytes per token, and they scale every head's share of a rank.

Scales are float16, stored in the same paged slots as the data ([G, slots, groups] or [slots, R, groups]), so
blocks, the block manager and the capacity report count them as the data.

int4 rows are stored rotated: x R with R an orthogonal d x d matrix (a normalized Hadamard matrix when d is a
power of two). A few channels of pretrained keys are many times larger than the rest, and a group's scale
follows its largest number, so the others lose most of their 15 levels; the rotation spreads every channel
over all of them. Attention never undoes it on the cache: q . k = (q R) . (k R), and a value's output rotates
back once per query, o = (sum_t p_t v_t R) R^T (backends.attend does both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CACHE_DTYPES = ("auto", "int8", "fp8_e4m3", "int4")
ALIASES = {"fp8": "fp8_e4m3"}
INT4_GROUP = 32  # numbers per int4 scale
SCALE_DTYPE = torch.float16
QMAX = {"int8": 127.0, "fp8_e4m3": 448.0, "int4": 7.0}


def parse_cache_dtype(name: str) -> str:
    """The canonical name of a cache dtype (fp8 is fp8_e4m3), or a ValueError that lists the choices."""
    canonical = ALIASES.get(name, name)
    if canonical not in CACHE_DTYPES:
        raise ValueError(f"unknown cache dtype {name!r}; choose one of {', '.join(CACHE_DTYPES + tuple(ALIASES))}")
    if canonical == "fp8_e4m3" and not hasattr(torch, "float8_e4m3fn"):
        raise ValueError(f"fp8_e4m3 needs a torch build with float8 (this is torch {torch.__version__}); "
                         "use int8, which costs the same bytes")
    return canonical


@dataclass(frozen=True)
class KVCacheDtype:
    """How keys and values are stored: a cache dtype each (see the module's docstring)."""

    k: str = "auto"
    v: str = "auto"

    @classmethod
    def parse(cls, k: str | None = None, v: str | None = None) -> KVCacheDtype:
        """From --kv-cache-dtype and --v-cache-dtype: values default to the keys' dtype."""
        k = parse_cache_dtype(k or "auto")
        return cls(k, parse_cache_dtype(v) if v else k)

    @property
    def quantized(self) -> bool:
        return self != AUTO

    def name(self) -> str:
        return self.k if self.k == self.v else f"k {self.k}, v {self.v}"


AUTO = KVCacheDtype()


def is_quantized(kind: str) -> bool:
    return kind != "auto"


def is_rotated(kind: str) -> bool:
    """Whether rows of this dtype are stored rotated (see the module's docstring)."""
    return kind == "int4"


_ROTATIONS: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def rotation(width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The orthogonal [width, width] matrix rotated rows are stored in: Sylvester's Hadamard matrix divided by
    sqrt(width) when width is a power of two, else a fixed random orthogonal matrix (QR of a seeded Gaussian)."""
    key = (width, torch.device(device), dtype)
    if key not in _ROTATIONS:
        _ROTATIONS[key] = _make_rotation(width, device, dtype)
    return _ROTATIONS[key]


@torch.inference_mode(False)
def _make_rotation(width: int, device, dtype: torch.dtype) -> torch.Tensor:
    """Built outside inference mode: the cached matrix is reused by later forwards that autograd records
    (healing, evaluation), which cannot save an inference tensor for backward."""
    if width & (width - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < width:
            h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
        return (h / width**0.5).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    return torch.linalg.qr(torch.randn(width, width, generator=gen, dtype=torch.float64))[0].to(device, dtype)


def group_size(kind: str, width: int) -> int:
    """Numbers per scale: the whole row in 8 bits; INT4_GROUP (or the whole row, if it does not divide) in 4."""
    if kind == "int4" and width % INT4_GROUP == 0:
        return INT4_GROUP
    return width


def num_groups(kind: str, width: int) -> int:
    return width // group_size(kind, width)


def stored_width(kind: str, width: int) -> int:
    """Elements per stored row: int4 packs two numbers per byte."""
    if kind == "int4":
        if width % 2:
            raise ValueError(f"an int4 cache needs an even head dimension, not {width}")
        return width // 2
    return width


def storage_dtype(kind: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the stored data: fp8 is kept as its bytes (uint8), since not every device copies
    float8 tensors by index."""
    return {"auto": model_dtype, "int8": torch.int8, "fp8_e4m3": torch.uint8, "int4": torch.uint8}[kind]


def quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [..., width] -> (data [..., stored_width], scales [..., groups] float16). The scale is rounded to
    float16 before the numbers are divided by it, so reading back multiplies by the very scale they saw."""
    width = x.shape[-1]
    g = group_size(kind, width)
    rows = x.float().reshape(*x.shape[:-1], width // g, g)
    scale = (rows.abs().amax(-1, keepdim=True) / QMAX[kind]).to(SCALE_DTYPE)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
    scaled = rows / safe
    if kind == "fp8_e4m3":
        data = scaled.clamp(-QMAX[kind], QMAX[kind]).to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        q = scaled.round().clamp(-QMAX[kind], QMAX[kind])
        data = q.to(torch.int8) if kind == "int8" else pack_int4(q)
    return data.reshape(*x.shape[:-1], stored_width(kind, width)), scale.squeeze(-1)


def dequantize(data: torch.Tensor, scale: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """(data [..., stored_width], scales [..., groups]) -> rows [..., width] in dtype."""
    values = stored_values(data, kind)
    groups = scale.shape[-1]
    values = values.view(*values.shape[:-1], groups, -1) * scale.float().unsqueeze(-1)
    return values.view(*values.shape[:-2], -1).to(dtype)


def stored_values(data: torch.Tensor, kind: str) -> torch.Tensor:
    """The stored numbers before their scales, float32 [..., width]. fp8 bytes and int4 byte pairs are read
    through a 256-entry table (a gather), several times faster on a CPU than a float8 cast or nibble
    arithmetic, and the same numbers."""
    if kind == "int8":
        return data.float()
    table = _tables(data.device)[kind]
    values = table.index_select(0, data.reshape(-1).int())
    return values.view(*data.shape[:-1], -1)


_TABLES: dict[torch.device, dict[str, torch.Tensor]] = {}


@torch.inference_mode(False)
def _tables(device: torch.device) -> dict[str, torch.Tensor]:
    """Per device: every byte as an e4m3 number [256], and as its two int4 numbers (low, high) [256, 2]; built
    outside inference mode, as they are kept for forwards that autograd may record."""
    if device not in _TABLES:
        byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        _TABLES[device] = {"fp8_e4m3": byte.view(torch.float8_e4m3fn).float().to(device),
                           "int4": unpack_int4(byte.view(256, 1)).view(256, 2).to(device)}
    return _TABLES[device]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Integers in [-7, 7], [..., n] -> bytes [..., n / 2]: q[2i] + 8 in the low nibble, q[2i + 1] + 8 high."""
    nibbles = (q.reshape(*q.shape[:-2], -1) + 8).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(data: torch.Tensor) -> torch.Tensor:
    """Bytes [..., n / 2] -> float32 integers [..., n] in [-8, 7]."""
    low = (data & 0xF).float() - 8
    high = (data >> 4).float() - 8
    return torch.stack((low, high), dim=-1).view(*data.shape[:-1], -1)
