"""Reference ratio_mask and topk_mask vs. formulations on the concatenated scores (fp64, stable sort)."""

from __future__ import annotations

import pytest
import torch

from fastclu import ops

SHAPES = [(), (1,), (0,), (7,), (3, 5), (4, 0), (2, 3, 4), (65,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _unpacked(masks, tensors) -> torch.Tensor:
    parts = []
    for m, t in zip(masks, tensors):
        assert m.dtype == torch.uint8 and m.numel() == (t.numel() + 7) // 8
        if t.numel() % 8:
            # Padding bits of the last byte are zero by the layout contract.
            assert int(m[-1]) >> (t.numel() % 8) == 0
        parts.append(ops.unpack_bits(m, t.numel()))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


# ---- ratio_mask --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_ratio_mask(dtype, as_tensor):
    ff = [torch.rand(s).to(dtype) for s in SHAPES]
    fr = [torch.rand(s).to(dtype) for s in SHAPES]
    gamma = float(torch.rand(()) + 0.5)
    eps = 1e-3
    masks = ops.ratio_mask(ff, fr, torch.tensor(gamma) if as_tensor else gamma, eps=eps, backend="reference")
    got = _unpacked(masks, ff)
    a = torch.cat([f.double().flatten() for f in ff]) + eps
    b = gamma * (torch.cat([f.double().flatten() for f in fr]) + eps)
    want = a >= b
    # Where the two sides agree to fp32 rounding the fp32 comparison may go either way.
    clear = (a - b).abs() > 1e-6 * b.abs()
    assert torch.equal(got[clear], want[clear])
    assert clear.float().mean() > 0.9


def test_ratio_mask_equal_fishers_all_set():
    f = [torch.rand(s) for s in SHAPES]
    got = _unpacked(ops.ratio_mask(f, [x.clone() for x in f], 1.0, backend="reference"), f)
    assert got.all()
    got = _unpacked(ops.ratio_mask(f, [x.clone() for x in f], 1.5, backend="reference"), f)
    assert not got.any()


def test_ratio_mask_empty_list():
    assert ops.ratio_mask([], [], 1.0, backend="reference") == []


# ---- topk_mask ---------------------------------------------------------------------------------


def _expected_topk(scores, k) -> torch.Tensor:
    """Bools over the concatenation: a stable descending sort keeps earlier indices first among ties."""
    flat = torch.cat([s.double().flatten() for s in scores])
    order = torch.sort(flat, descending=True, stable=True).indices
    want = torch.zeros(flat.numel(), dtype=torch.bool)
    want[order[:k]] = True
    return want


def _check_topk(scores, k):
    masks = ops.topk_mask(scores, k, backend="reference")
    got = _unpacked(masks, scores)
    assert int(got.sum()) == k
    assert sum(ops.count_bits(m) for m in masks) == k
    want = _expected_topk(scores, k)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_random(dtype):
    scores = [torch.randn(s).to(dtype) for s in SHAPES]
    total = sum(s.numel() for s in scores)
    for k in {0, 1, total // 3, total // 2, total - 1, total, int(torch.randint(0, total + 1, ()))}:
        _check_topk(scores, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_heavy_ties(dtype):
    # A handful of distinct values, both signs and signed zeros: ties decide most of the mask.
    values = torch.tensor([-2.0, -0.0, 0.0, 1.0, 3.0, float("inf"), -float("inf")])
    scores = [values[torch.randint(0, len(values), s)].to(dtype) for s in [*SHAPES, (300,), (11, 13)]]
    total = sum(s.numel() for s in scores)
    ks = {0, total, int(torch.randint(0, total + 1, ()))}
    flat = torch.cat([s.double().flatten() for s in scores])
    for v in values.unique():
        # k landing exactly at and just inside a tie group's boundary.
        ks.add(int((flat > v).sum()))
        ks.add(min(total, int((flat > v).sum()) + 1))
    for k in sorted(ks):
        _check_topk(scores, k)


def test_topk_all_equal():
    scores = [torch.full((5, 3), 0.25), torch.full((9,), 0.25)]
    for k in (0, 1, 7, 15, 16, 24):
        _check_topk(scores, k)


def test_topk_fp64_resolves_below_fp32():
    # Values that collapse to one fp32 number must still be ordered exactly in fp64.
    base = torch.full((64,), 1.0, dtype=torch.float64)
    offsets = torch.randperm(64).double() * 1e-12
    scores = [base + offsets, -(base[:10] + offsets[:10])]
    for k in (1, 5, 32, 63, 64, 70):
        _check_topk(scores, k)


def test_topk_extremes():
    f = torch.finfo(torch.float32)
    vals = torch.tensor([f.max, -f.max, f.tiny, -f.tiny, 1e-45, -1e-45, 0.0, -0.0, float("inf"), -float("inf")])
    scores = [vals[torch.randperm(len(vals))], vals.clone()]
    for k in range(21):
        _check_topk(scores, k)


def test_topk_larger():
    scores = [torch.randn(20_000), torch.randint(-3, 3, (8_000,)).float(), torch.randn(333)]
    for k in (5_432, 20_000, 25_000):
        _check_topk(scores, k)


def test_topk_nan_rejected():
    s = torch.randn(10)
    s[4] = float("nan")
    with pytest.raises(ValueError, match="scores"):
        ops.topk_mask([torch.randn(3), s], 2, backend="reference")


def test_topk_empty():
    assert ops.topk_mask([], 0, backend="reference") == []
    masks = ops.topk_mask([torch.zeros(0), torch.zeros(0, 4)], 0, backend="reference")
    assert [m.numel() for m in masks] == [0, 0]
