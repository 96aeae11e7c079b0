"""The Triton multi-tensor tables: block map, global order, caching and rebuilds."""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import DEVICE, TRITON, assert_close, clone, rand, randn

from fastclu.ops import fisher_accumulate_

pytestmark = TRITON


def _mt():
    import fastclu

    assert fastclu.backends()["triton"] is None
    from fastclu.ops.triton import _multitensor as mt

    return mt


def test_block_map_covers_every_element_once() -> None:
    mt = _mt()
    sizes = [0, 1, mt.BLOCK - 1, mt.BLOCK, mt.BLOCK + 1, 3 * mt.BLOCK + 5, 0]
    xs = [torch.empty(n, device=DEVICE) for n in sizes]
    gs, total = mt.groups([xs])
    (g,) = gs
    assert total == g.n_blocks == sum(-(-n // mt.BLOCK) for n in sizes)
    covered = [torch.zeros(n, dtype=torch.int32) for n in sizes]
    for t, s in zip(g.blk_tensor.tolist(), g.blk_start.tolist()):
        i = g.members[t]
        covered[i][s : s + mt.BLOCK] += 1
    assert all(bool((c == 1).all()) for c in covered)
    assert sorted(g.blk_global.tolist()) == list(range(total))
    # whole blocks first (they run unmasked), then the tails
    ends = [s + mt.BLOCK <= sizes[g.members[t]] for t, s in zip(g.blk_tensor.tolist(), g.blk_start.tolist())]
    assert ends == [True] * g.n_full + [False] * (g.n_blocks - g.n_full)
    assert g.n_full == sum(n // mt.BLOCK for n in sizes)
    assert g.align in (1, 2, 4, 8, 16) and all(x.data_ptr() % g.align == 0 for x in xs)
    assert g.ptrs[0].tolist() == [x.data_ptr() for x in xs]


def test_groups_split_by_dtype_keep_global_order() -> None:
    mt = _mt()
    spec = [(5, torch.float16), (9000, torch.float32), (3, torch.float16), (0, torch.float32), (7, torch.bfloat16)]
    xs = [torch.empty(n, device=DEVICE, dtype=d) for n, d in spec]
    gs, total = mt.groups([xs])
    assert sorted(i for g in gs for i in g.members) == list(range(len(xs)))
    ranks = sorted(r for g in gs for r in g.blk_global.tolist())
    assert ranks == list(range(total))
    for g in gs:
        assert len({xs[i].dtype for i in g.members}) == 1
        # global ranks follow (tensor, offset) order whatever the launch order
        pairs = sorted(zip(g.blk_global.tolist(), [g.members[t] for t in g.blk_tensor.tolist()], g.blk_start.tolist()))
        assert [p[1:] for p in pairs] == sorted(p[1:] for p in pairs)


def test_table_is_cached_and_rebuilt_when_params_change() -> None:
    mt = _mt()
    xs = randn([7, 4097])
    first, _ = mt.groups([xs])
    again, _ = mt.groups([xs])
    assert again is first  # same tensors: no rebuild, no host-to-device copy
    ys = xs + randn([33])  # a parameter added between tasks
    grown, _ = mt.groups([ys])
    assert grown is not first and grown[0].n_tensors == 3
    zs = [torch.randn(7, device=DEVICE), torch.randn(4097, device=DEVICE)]  # new storage, same shapes
    fresh, _ = mt.groups([zs])
    assert fresh[0].ptrs[0].tolist() == [z.data_ptr() for z in zs]


def test_op_after_param_set_change_matches_reference() -> None:
    f1, g1 = rand([7, 4097]), randn([7, 4097])
    fisher_accumulate_(f1, g1, 1.0, backend="triton")
    f2 = rand([4097, 7, 13])
    g2 = randn([4097, 7, 13])
    got, want = clone(f2), clone(f2)
    fisher_accumulate_(got, g2, 1.0, backend="triton")
    fisher_accumulate_(want, g2, 1.0, backend="reference")
    assert_close(got, want, torch.float32)


def test_bench_runs() -> None:
    """The speed-reading script works end to end (numbers here are interpreter timings: ignored)."""
    _mt()
    from fastclu.ops.triton import bench

    rows = bench.run(1024, 2, 1, DEVICE)
    assert rows[0][0].startswith("copy") and len(rows) >= 14
    assert all(sec > 0 and gbs > 0 for _, sec, gbs in rows)


def test_tables_used_in_graph_capture_survive_eviction(monkeypatch) -> None:
    """A captured CUDA graph keeps reading its tables' device memory on every replay: an LRU
    eviction must not free them. Capture is simulated (the host logic is device independent)."""
    mt = _mt()
    xs = randn([7, 4097])
    first, _ = mt.groups([xs])  # warm-up, outside capture
    monkeypatch.setattr(mt, "_capturing", lambda dev: True)
    during, _ = mt.groups([xs])
    assert during is first
    # a table missing during capture cannot be built (host -> device copy): a clear error
    with pytest.raises(RuntimeError, match="warm-up"):
        mt.groups([randn([5])])
    monkeypatch.setattr(mt, "_capturing", lambda dev: False)
    keep = [randn([3]) for _ in range(mt._CACHE_SIZE + 5)]  # evicts every earlier entry from the LRU
    for k in keep:
        mt.groups([k])
    again, _ = mt.groups([xs])
    assert again is first  # the pinned table, same device memory, not a rebuilt copy


def test_table_segments_are_16_byte_aligned() -> None:
    """Every sub-table pointer 16-byte aligned whatever the tensor / block counts: Triton's
    pointer-alignment specialisation then never varies (no recompile when the set changes)."""
    mt = _mt()
    for sizes in ([1], [1, 2], [3, mt.BLOCK + 1, 5], [mt.BLOCK * 2, 1, 1, 1]):
        for n_ops in (1, 2, 3):
            xs = randn(sizes)
            gs, _ = mt.groups([xs] * n_ops)
            for g in gs:
                for name in ("ptrs", "numel", "index", "rowlen", "blk_tensor", "blk_start", "blk_global"):
                    assert getattr(g, name).data_ptr() % 16 == 0, (sizes, n_ops, name)
                assert g.ptrs.shape == (n_ops, g.n_tensors)
                assert g.numel.tolist() == [xs[i].numel() for i in g.members]
                assert g.index.tolist() == list(g.members)
                assert g.blk_global.numel() == g.blk_start.numel() == g.blk_tensor.numel() == g.n_blocks
