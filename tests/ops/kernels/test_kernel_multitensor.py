"""The Triton multi-tensor tables: block map, global order, caching and rebuilds."""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import DEVICE, TRITON, assert_close, clone, rand, randn

from fastclu.ops import _table, fisher_accumulate_

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
    blk_tensor, blk_start, blk_global = mt.block_map(g)
    covered = [torch.zeros(n, dtype=torch.int32) for n in sizes]
    for t, s in zip(blk_tensor, blk_start):
        i = g.members[t]
        covered[i][s : s + mt.BLOCK] += 1
    assert all(bool((c == 1).all()) for c in covered)
    assert sorted(blk_global) == list(range(total))
    # whole blocks first (they run unmasked), then the tails
    ends = [s + mt.BLOCK <= sizes[g.members[t]] for t, s in zip(blk_tensor, blk_start)]
    assert ends == [True] * g.n_full + [False] * (g.n_blocks - g.n_full)
    assert g.n_full == sum(n // mt.BLOCK for n in sizes)
    assert g.align in (1, 2, 4, 8, 16) and all(x.data_ptr() % g.align == 0 for x in xs)
    assert _ptrs(g)[0].tolist() == [x.data_ptr() for x in xs]
    # O(tensors): one row per tensor and one tail entry per tensor with a partial block
    assert g.tab.numel() == len(sizes) * (_table.HEADER + 1) + g.n_tail


def test_device_search_finds_every_block() -> None:
    """The kernels' own binary search (run by a probe kernel) lands every program on its block."""
    mt = _mt()
    sizes = [0, 3, mt.BLOCK, 0, 2 * mt.BLOCK + 1, mt.BLOCK - 1, 0, 5 * mt.BLOCK]
    xs = [torch.empty(n, device=DEVICE) for n in sizes]
    (g,) = mt.groups([xs])[0]
    rows, starts, ranks = _probe(mt, g)
    assert (rows, starts, ranks) == tuple(list(v) for v in mt.block_map(g))


def test_groups_split_by_dtype_keep_global_order() -> None:
    mt = _mt()
    spec = [(5, torch.float16), (9000, torch.float32), (3, torch.float16), (0, torch.float32), (7, torch.bfloat16)]
    xs = [torch.empty(n, device=DEVICE, dtype=d) for n, d in spec]
    gs, total = mt.groups([xs])
    assert sorted(i for g in gs for i in g.members) == list(range(len(xs)))
    ranks = sorted(r for g in gs for r in mt.block_map(g)[2])
    assert ranks == list(range(total))
    for g in gs:
        assert len({xs[i].dtype for i in g.members}) == 1
        # global ranks follow (tensor, offset) order whatever the launch order
        bt, bs, bg = mt.block_map(g)
        pairs = sorted(zip(bg, [g.members[t] for t in bt], bs))
        assert [p[1:] for p in pairs] == sorted(p[1:] for p in pairs)
        assert _probe(mt, g) == (bt, bs, bg)


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
    assert _ptrs(fresh[0])[0].tolist() == [z.data_ptr() for z in zs]


def test_per_step_operands_move_without_a_rebuild() -> None:
    mt = _mt()
    xs = randn([7, 4097])
    gs1 = [randn([7, 4097]) for _ in range(3)]
    _table.reset_stats()
    first, _ = mt.groups([xs, gs1[0]], dynamic=(1,))
    for g in [*gs1[1:], gs1[1]]:
        again, _ = mt.groups([xs, g], dynamic=(1,))
        assert again is first
        assert _ptrs(again[0]).tolist() == [[x.data_ptr() for x in xs], [y.data_ptr() for y in g]]
    mt.groups([xs, gs1[1]], dynamic=(1,))  # unchanged addresses: no upload either
    assert _table.stats() == {"builds": 1, "hits": 4, "pointer_uploads": 4}
    # declared stable, the same change is a rebuild
    mt.groups([xs, gs1[0]])
    mt.groups([xs, gs1[2]])
    assert _table.stats()["builds"] == 3


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
    monkeypatch.setattr(_table, "capturing", lambda dev: True)
    during, _ = mt.groups([xs])
    assert during is first
    # a table missing during capture cannot be built (host -> device copy): a clear error
    with pytest.raises(RuntimeError, match="warm-up"):
        mt.groups([randn([5])])
    monkeypatch.setattr(_table, "capturing", lambda dev: False)
    keep = [randn([3]) for _ in range(_table.CACHE_SIZE + 5)]  # evicts every earlier entry from the LRU
    for k in keep:
        mt.groups([k])
    again, _ = mt.groups([xs])
    assert again is first  # the pinned table, same device memory, not a rebuilt copy


def test_capture_reuses_pointer_arrays_and_refuses_moved_ones(monkeypatch) -> None:
    """Per-step pointers during a (simulated) capture: the warm-up's array is reused and pinned;
    moved ones would need an upload, which a capture cannot replay: a clear error, no change."""
    mt = _mt()
    xs, gs = randn([7, 4097]), randn([7, 4097])
    warm, _ = mt.groups([xs, gs], dynamic=(1,))
    dyn = warm[0].dyn
    monkeypatch.setattr(_table, "capturing", lambda dev: True)
    during, _ = mt.groups([xs, gs], dynamic=(1,))
    assert during is warm and during[0].dyn is dyn
    with pytest.raises(RuntimeError, match="per-step operands"):
        mt.groups([xs, randn([7, 4097])], dynamic=(1,))
    assert warm[0].dyn is dyn and _ptrs(warm[0])[1].tolist() == [g.data_ptr() for g in gs]
    monkeypatch.setattr(_table, "capturing", lambda dev: False)
    mt.groups([xs, randn([7, 4097])], dynamic=(1,))  # eager again: a new array
    assert warm[0].dyn is not dyn
    # the captured array stays referenced (a replay reads it)
    pinned = [d for e in _table._pinned.values() if e.parts is warm for ds in e.pinned_dyn for d in ds]
    assert any(d is dyn for d in pinned)


def test_table_segments_are_16_byte_aligned() -> None:
    """Every table pointer 16-byte aligned whatever the tensor / block counts: Triton's
    pointer-alignment specialisation then never varies (no recompile when the set changes)."""
    mt = _mt()
    for sizes in ([1], [1, 2], [3, mt.BLOCK + 1, 5], [mt.BLOCK * 2, 1, 1, 1]):
        for n_ops in (1, 2, 3):
            xs = randn(sizes)
            gs, _ = mt.groups([xs] * n_ops, dynamic=(1,) if n_ops > 1 else ())
            for g in gs:
                tab, dyn, _ = mt.table_args(g)
                assert tab.data_ptr() % 16 == 0 and dyn.data_ptr() % 16 == 0, (sizes, n_ops)
                assert _ptrs(g).shape == (n_ops, g.n_tensors)
                rows = _table.host_rows(g)
                assert rows[:, _table.COL_NUMEL].tolist() == [xs[i].numel() for i in g.members]
                assert rows[:, _table.COL_INDEX].tolist() == list(g.members)
                assert len(mt.block_map(g)[0]) == g.n_blocks


def _ptrs(g):
    return _table.resolved_ptrs(g)


def _probe(mt, g) -> tuple[list[int], list[int], list[int]]:
    """Run the device-side search of every launch of ``g``: (row, start, rank) per program."""
    import triton
    import triton.language as tl

    globals()["block_info_ranked"] = mt.block_info_ranked  # the kernel's global, as in fastclu.ops.triton

    @triton.jit
    def probe(tab, dyn, n_rows, out, base, BLOCK: tl.constexpr, EVEN: tl.constexpr, LAYOUT: tl.constexpr):
        pid = tl.program_id(0)
        t, offs, _, rank = block_info_ranked(tab, n_rows, pid, BLOCK, EVEN, LAYOUT)  # noqa: F821
        i = (base + pid) * 3
        tl.store(out + i, t.to(tl.int64))
        tl.store(out + i + 1, tl.min(offs, axis=0))
        tl.store(out + i + 2, rank)

    out = torch.full((g.n_blocks * 3,), -1, dtype=torch.int64, device=DEVICE)
    base = 0
    for _, n, even in mt.launches(g):
        probe[(n,)](*mt.table_args(g), out, base, BLOCK=mt.BLOCK, EVEN=even, LAYOUT=mt.layout(g))
        base += n
    v = out.view(-1, 3).T.tolist()
    return v[0], v[1], v[2]
