"""Reference soup_combine_ / soup_coef_grads vs. direct fp64 formulas; argument checks."""

from __future__ import annotations

import pytest
import torch

from fastclu import ops

SHAPES = [(), (1,), (0,), (7,), (3, 5), (4, 0), (2, 3, 4), (65,)]
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def _fp64_combine(base, diffs, coefs, i):
    col = i if coefs.shape[1] > 1 else 0
    return base[i].double() + sum(coefs[k, col].double() * d[i].double() for k, d in enumerate(diffs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("K", [1, 3])
def test_soup_combine(dtype, layerwise, K):
    base = [torch.randn(s).to(dtype) for s in SHAPES]
    diffs = [[(0.5 * torch.randn(s)).to(dtype) for s in SHAPES] for _ in range(K)]
    coefs = torch.randn(K, len(SHAPES) if layerwise else 1)
    out = [torch.full(s, float("nan"), dtype=dtype) for s in SHAPES]
    ops.soup_combine_(out, base, diffs, coefs, backend="reference")
    for i, o in enumerate(out):
        want = _fp64_combine(base, diffs, coefs, i)
        torch.testing.assert_close(o.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * 4)


def test_soup_combine_into_base_itself():
    base = [torch.randn(s) for s in SHAPES]
    keep = [b.clone() for b in base]
    diffs = [[torch.randn(s) for s in SHAPES] for _ in range(2)]
    coefs = torch.randn(2, 1)
    ops.soup_combine_(base, base, diffs, coefs, backend="reference")
    for i, b in enumerate(base):
        torch.testing.assert_close(b.double(), _fp64_combine(keep, diffs, coefs, i), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layerwise", [False, True])
def test_soup_coef_grads(dtype, layerwise):
    K = 3
    grads = [torch.randn(s).to(dtype) for s in SHAPES]
    diffs = [[torch.randn(s).to(dtype) for s in SHAPES] for _ in range(K)]
    got = ops.soup_coef_grads(grads, diffs, layerwise=layerwise, backend="reference")
    want = torch.tensor([[float((g.double() * d[i].double()).sum()) for i, g in enumerate(grads)] for d in diffs],
                        dtype=torch.float64)  # fmt: skip
    if not layerwise:
        want = want.sum(1, keepdim=True)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_soup_coef_grads_empty_list():
    got = ops.soup_coef_grads([], [[], []], backend="reference")
    assert got.shape == (2, 0)


def _args():
    base = [torch.randn(3), torch.randn(2, 2)]
    # the outputs hold random values (not torch.empty: uninitialised memory may hold some NaNs,
    # which no equality check can compare bit for bit)
    return [torch.randn(3), torch.randn(2, 2)], base, [[torch.randn(3), torch.randn(2, 2)]], torch.randn(1, 2)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.__setitem__(2, []), "diffs must hold 1..12"),
        (lambda a: a.__setitem__(2, [[torch.randn(3), torch.randn(2, 2)]] * 13), "diffs must hold 1..12"),
        (lambda a: a.__setitem__(2, [[torch.randn(3), torch.randn(4)]]), r"diffs\[0\]"),
        (lambda a: a.__setitem__(2, [[torch.randn(3)]]), r"diffs\[0\]"),
        (lambda a: a.__setitem__(3, torch.randn(2, 3)), "coefs must have shape"),
        (lambda a: a.__setitem__(3, torch.randn(2)), "coefs must have shape"),
        (lambda a: a.__setitem__(3, [1.0, 2.0]), "coefs must be a floating-point Tensor"),
        (lambda a: a.__setitem__(1, [torch.randn(3)]), "base"),
        (lambda a: a.__setitem__(2, torch.randn(3)), "diffs must be a list"),
    ],
)
def test_soup_combine_bad_arguments_change_nothing(change, match):
    a = list(_args())
    change(a)
    out = a[0]
    before = [o.clone() for o in out]
    with pytest.raises((TypeError, ValueError), match=match):
        ops.soup_combine_(*a, backend="reference")
    assert all(torch.equal(o, b) for o, b in zip(out, before))


def test_soup_coef_grads_bad_arguments():
    grads = [torch.randn(3), torch.randn(2, 2)]
    with pytest.raises(TypeError, match=r"diffs\[1\]\[0\] has dtype"):
        ops.soup_coef_grads(grads, [[torch.randn(3), torch.randn(2, 2)], [torch.randn(3).half(), torch.randn(2, 2)]])
    with pytest.raises(ValueError, match=r"diffs\[0\]"):
        ops.soup_coef_grads(grads, [[torch.randn(3)]])
    with pytest.raises(ValueError, match="diffs must hold"):
        ops.soup_coef_grads(grads, [])
