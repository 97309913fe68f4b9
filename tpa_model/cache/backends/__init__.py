"""Attention backends: how new keys and values enter the cache and how queries attend over it.

A backend implements three operations on one layer's storage (a LayerKV, see kv_cache.py), reading the
cache through the step's block tables:
    write(kv, slots, k, v)               store the new tokens' keys and values (plain or factors)
    decode(q, kv, pool, meta, scale)     one query token for each of the first meta.num_decodes sequences
    prefill(q, kv, pool, meta, scale)    the new tokens of the other sequences, each over its cached prefix
                                         and itself
`attend` runs them for one layer of a step. The PyTorch reference backend runs everywhere; the Triton backend
(CUDA) runs decodes on paged split-K kernels (triton_decode.py) and prefill chunks on a paged kernel that
rebuilds keys and values from factors one tile at a time (triton_prefill.py); it writes as the reference does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from ..quantization import is_rotated, rotation

if TYPE_CHECKING:
    from ..kv_cache import LayerKV
    from ..metadata import AttentionMetadata, PoolMetadata


class AttentionBackend(Protocol):
    name: str

    def write(self, kv: LayerKV, slots: torch.Tensor, k: tuple[torch.Tensor, ...], v: tuple[torch.Tensor, ...]):
        ...

    def decode(
        self, q: torch.Tensor, kv: LayerKV, pool: PoolMetadata, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """q [D, H, d] for the D decode sequences -> [D, H, d]."""
        ...

    def prefill(
        self, q: torch.Tensor, kv: LayerKV, pool: PoolMetadata, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """q [P, H, d], the new tokens of the prefill sequences (meta.prefill_seqs(), in order) -> [P, H, d]."""
        ...


def attend(
    layer: int,
    q: torch.Tensor,
    k: tuple[torch.Tensor, ...],
    v: tuple[torch.Tensor, ...],
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Store one layer's new keys and values, then attend every query of the step. q: [N, H, d]. Keys stored
    rotated (int4, quantization.py; the write rotates them) meet the queries rotated alike, and values stored
    rotated give outputs that are rotated back once."""
    kv = meta.kv.layers[layer]
    spec = kv.spec
    rotate_k, rotate_v = is_rotated(spec.k_cache_dtype), is_rotated(spec.v_cache_dtype)
    if not (rotate_k or rotate_v):
        return attend_stored(kv, q, k, v, meta, scale, layer)
    turn = rotation(spec.head_dim, q.device, q.dtype)
    out = attend_stored(kv, q @ turn if rotate_k else q, k, v, meta, scale, layer)
    return out @ turn.T if rotate_v else out


def attend_stored(kv: LayerKV, q: torch.Tensor, k: tuple[torch.Tensor, ...], v: tuple[torch.Tensor, ...],
                  meta: AttentionMetadata, scale: float, layer: int) -> torch.Tensor:
    """attend, on the rows as they are stored."""
    pool = meta.pools[meta.kv.pool_of_layer[layer]]
    backend = meta.backend
    backend.write(kv, pool.slot_mapping, k, v)
    if meta.num_decodes == meta.num_seqs:
        return backend.decode(q, kv, pool, meta, scale)
    split = meta.query_start[meta.num_decodes]
    if not split:
        return backend.prefill(q, kv, pool, meta, scale)
    out = torch.empty_like(q)
    out[:split] = backend.decode(q[:split], kv, pool, meta, scale)
    out[split:] = backend.prefill(q[split:], kv, pool, meta, scale)
    return out


BACKENDS = ("auto", "reference", "triton")


def default_backend(device: torch.device | str) -> AttentionBackend:
    """The contiguous path's backend (model(input_ids), generate(), conversion, healing): the reference on
    every device. It is differentiable, which healing needs; the Triton kernels are not. The engine picks
    its own with make_backend."""
    return make_backend("reference", device)


def make_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """The backend called `name` for a model on `device`. auto: the Triton kernels on CUDA when triton
    imports, else the reference. Triton on a CPU runs only in its interpreter (TRITON_INTERPRET=1, the tests)."""
    from .reference import ReferenceBackend

    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    on_cuda = torch.device(device).type == "cuda"
    if name == "reference" or (name == "auto" and not (on_cuda and triton_available())):
        return ReferenceBackend()
    if not triton_available():
        raise ValueError("the triton attention backend needs the triton package (pip install triton)")
    from .triton_common import interpreter_enabled
    from .triton_decode import TritonBackend

    if not on_cuda and not interpreter_enabled():
        raise ValueError(f"the triton attention backend runs on CUDA (device here: {device}); on a CPU only "
                         "under TRITON_INTERPRET=1, for tests. Use --attention-backend reference")
    return TritonBackend()


def triton_available() -> bool:
    """Whether triton imports (it is an optional dependency: the 'cuda' and 'test' extras)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
