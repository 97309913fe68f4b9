"""The reference attention backend against dense attention, through real block tables.

Each case writes random keys and values (plain or factored) into a paged cache whose block tables are
shuffled, then attends a mixed step (decodes and prefill chunks, lengths that are not multiples of the block
size, windows, an image span) and compares with dense attention over the materialized keys, in float64.
"""

import pytest
import torch

from tpa_model.cache.backends import attend
from tpa_model.cache.backends.reference import ReferenceBackend
from tpa_model.cache.kv_cache import CacheSpec, KVCache
from tpa_model.cache.metadata import build_metadata

G, D_HEAD, H, BLOCK = 4, 16, 8, 4
SCALE = 0.3


def random_entries(spec: CacheSpec, T: int, gen) -> tuple[tuple, tuple, torch.Tensor, torch.Tensor]:
    """(k parts, v parts) for T tokens as the cache stores them, and the dense K, V [T, G, d] they describe."""

    def part(rank, factored):
        if factored:
            head, token = torch.randn(T, rank, G, generator=gen), torch.randn(T, rank, D_HEAD, generator=gen)
            return (head, token), torch.einsum("trg,trd->tgd", head, token)
        dense = torch.randn(T, G, D_HEAD, generator=gen)
        return (dense,), dense

    k, k_dense = part(spec.k_rank, spec.k_factored)
    v, v_dense = part(spec.v_rank, spec.v_factored)
    return k, v, k_dense, v_dense


def dense_reference(q, k, v, q_pos, limits, window):
    """q [L, H, d] at positions q_pos; k, v [T, G, d] at positions 0..T-1; float64."""
    k_pos = torch.arange(k.shape[0])
    visible = k_pos[None, :] <= limits[:, None]
    if window is not None:
        visible &= (q_pos[:, None] - k_pos[None, :]) < window
    kh = k.double().repeat_interleave(H // G, dim=1)  # [T, H, d]
    vh = v.double().repeat_interleave(H // G, dim=1)
    s = torch.einsum("lhd,thd->hlt", q.double(), kh) * SCALE
    p = torch.softmax(s.masked_fill(~visible[None], float("-inf")), -1)
    return torch.einsum("hlt,thd->lhd", p, vh)


def tables_for(lengths, num_blocks, gen):
    """A shuffled block table per sequence, long enough for its tokens."""
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for n in lengths:
        need = -(-n // BLOCK)
        tables.append(order[:need])
        order = order[need:]
    return tables


SPECS = {
    "standard": (G, G),
    "factors": (2, 1),
    "k factored, v plain": (1, G),
    "k plain, v factored": (G, 3),
}


def mixed_step(spec: CacheSpec, backend, steps, gen, image=None):
    """One step of sequences given as (cached tokens, new tokens), over a paged cache of one layer with shuffled
    block tables: the cached prefixes are written first, as earlier steps would, then the step attends.
    Returns (metadata, queries, output, each sequence's (k parts, v parts, dense K, dense V))."""
    kv = KVCache([spec], {"global" if spec.window is None else "sliding": 64}, BLOCK, "cpu")
    totals = [a + b for a, b in steps]
    tables = tables_for(totals, 64, gen)
    entries = [random_entries(spec, T, gen) for T in totals]

    def parts(which, starts, lengths, seqs):
        """The stored tensors (keys: which=0, values: 1) of tokens [start, start + n) of the given sequences."""
        count = len(entries[0][which])
        return tuple(torch.cat([entries[i][which][j][a : a + n] for i, a, n in zip(seqs, starts, lengths)])
                     for j in range(count))

    cached = [a for a, _ in steps]
    warm = [i for i, a in enumerate(cached) if a]
    zeros, warm_lengths = [0] * len(warm), [cached[i] for i in warm]
    meta0 = build_metadata(kv, backend, zeros, warm_lengths, [[tables[i] for i in warm]], [])
    backend.write(kv.layers[0], meta0.pools[0].slot_mapping, parts(0, zeros, warm_lengths, warm),
                  parts(1, zeros, warm_lengths, warm))
    lengths, seqs = [n for _, n in steps], range(len(steps))
    meta = build_metadata(kv, backend, cached, lengths, [tables], [], image)
    q = torch.randn(sum(lengths), H, D_HEAD, generator=gen)
    out = attend(0, q, parts(0, cached, lengths, seqs), parts(1, cached, lengths, seqs), meta, SCALE)
    return meta, q, out, entries


@pytest.mark.parametrize("ranks", SPECS.values(), ids=SPECS.keys())
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("tiles", ["one tile", "one block per tile"])
def test_mixed_step_equals_dense_attention(ranks, window, tiles):
    gen = torch.Generator().manual_seed(0)
    spec = CacheSpec(G, D_HEAD, *ranks, window, torch.float32)
    backend = ReferenceBackend() if tiles == "one tile" else ReferenceBackend(tile_bytes=1, tile_scores=1)
    # (cached tokens, new tokens): three decodes, then prefill chunks (one from scratch, one with an image)
    steps = [(12, 1), (0, 1), (21, 1), (0, 7), (9, 10)]
    image = [[], [], [], [], [(12, 15)]]  # positions 12..14 of the last sequence are one image
    meta, q, out, entries = mixed_step(spec, backend, steps, gen, image)
    assert meta.num_decodes == 3
    for i in range(len(steps)):
        lo, hi = meta.query_start[i], meta.query_start[i + 1]
        k_dense, v_dense = entries[i][2], entries[i][3]
        expected = dense_reference(q[lo:hi], k_dense, v_dense, meta.positions[lo:hi], meta.limits[lo:hi], window)
        assert (out[lo:hi].double() - expected).abs().max() <= 1e-5, f"sequence {i}"


def test_freed_blocks_before_the_window_are_never_read():
    """A sliding pool's tables hold -1 for dropped blocks; attention must never need them."""
    gen = torch.Generator().manual_seed(1)
    spec = CacheSpec(G, D_HEAD, 2, 2, 6, torch.float32)
    kv = KVCache([spec], {"sliding": 32}, BLOCK, "cpu")
    backend = ReferenceBackend()
    T = 30
    table = tables_for([T], 32, gen)[0]
    k, v, k_dense, v_dense = random_entries(spec, T, gen)
    write = build_metadata(kv, backend, [0], [T], [[table]], [])
    backend.write(kv.layers[0], write.pools[0].slot_mapping, k, v)
    kv.layers[0].k[0].view(-1, BLOCK, 2, G)[table[:5]] = float("nan")  # poison what the window dropped
    freed = [-1] * 5 + table[5:]
    meta = build_metadata(kv, backend, [T - 1], [1], [[freed]], [0])
    q = torch.randn(1, H, D_HEAD, generator=gen)
    new_k, new_v = tuple(t[T - 1 :] for t in k), tuple(t[T - 1 :] for t in v)
    out = attend(0, q, new_k, new_v, meta, SCALE)
    expected = dense_reference(q, k_dense, v_dense, torch.tensor([T - 1]), torch.tensor([T - 1]), 6)
    assert (out.double() - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="freed"):
        build_metadata(kv, backend, [10], [1], [[freed]], [0])


def test_step_metadata_arrays_start_16_byte_aligned():
    """Kernels are compiled per pointer alignment: every device array of a step starts on 16 bytes, whatever
    the sizes of the arrays before it in the step's buffer, so steps of any shape reuse the same kernels."""
    spec = CacheSpec(G, D_HEAD, 2, 1, None, torch.float32)
    kv = KVCache([spec], {"global": 40}, BLOCK, "cpu")
    gen = torch.Generator().manual_seed(0)
    for lengths, starts in [([1], [6]), ([1, 1, 3], [4, 9, 0]), ([1, 5, 2, 7], [3, 0, 8, 2])]:
        tables = tables_for([s + n for s, n in zip(starts, lengths)], 40, gen)
        ends = list(torch.tensor(lengths).cumsum(0) - 1)
        meta = build_metadata(kv, ReferenceBackend(), starts, lengths, [tables], [int(e) for e in ends], device="cpu")
        pool = meta.pools[0]
        arrays = [meta.positions, meta.limits, meta.logits_indices, meta.seq_starts, pool.slot_mapping,
                  pool.block_tables, pool.first_key_pos]
        assert len({a.untyped_storage().data_ptr() for a in arrays}) == 1  # one buffer, one copy to the device
        assert [a.data_ptr() % 16 for a in arrays] == [0] * len(arrays), lengths
