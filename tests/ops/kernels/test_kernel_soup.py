"""soup_combine_ / soup_coef_grads kernels against fp64 formulas and the reference; determinism."""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import (
    BACKENDS,
    BIG,
    FLOATS,
    SIZES,
    TOL,
    many_sizes,
    need,
    poison_alloc,  # noqa: F401
    poisoned_like,
    randn,
)

from fastclu.ops import soup_coef_grads, soup_combine_


def _coefs(K: int, L: int, layerwise: bool) -> torch.Tensor:
    from _kernel_cases import DEVICE

    return torch.randn(K, L if layerwise else 1, device=DEVICE)


def _check_combine(backend: str, sizes, dtype, K: int, layerwise: bool) -> None:
    base = randn(sizes, dtype)
    diffs = [randn(sizes, dtype, 0.5) for _ in range(K)]
    coefs = _coefs(K, len(sizes), layerwise)
    out = poisoned_like(base)
    soup_combine_(out, base, diffs, coefs, backend=backend)
    want = poisoned_like(base)
    soup_combine_(want, base, diffs, coefs, backend="reference")
    rtol, atol = TOL[dtype]
    for i, o in enumerate(out):
        col = i if layerwise else 0
        exact = base[i].double() + sum(coefs[k, col].double() * d[i].double() for k, d in enumerate(diffs))
        scale = 1.0 + float(coefs.abs().sum())  # K fp32 roundings of terms of order |c|
        assert o.dtype == dtype and not o.isnan().any(), f"tensor {i} not fully written"
        torch.testing.assert_close(o.double(), exact, rtol=rtol * scale, atol=atol * scale)
        torch.testing.assert_close(o.double(), want[i].double(), rtol=rtol * scale, atol=atol * scale)


def _check_grads(backend: str, sizes, dtype, K: int, layerwise: bool) -> None:
    grads = randn(sizes, dtype)
    diffs = [randn(sizes, dtype) for _ in range(K)]
    got = soup_coef_grads(grads, diffs, layerwise=layerwise, backend=backend)
    ref = soup_coef_grads(grads, diffs, layerwise=layerwise, backend="reference")
    exact = torch.tensor([[float((g.double() * d[i].double()).sum()) for i, g in enumerate(grads)] for d in diffs],
                         dtype=torch.float64)  # fmt: skip
    # |<g, d>| <= ||g|| ||d||: the scale of each entry's rounding (fp32 products, fp64 sums)
    norms = torch.tensor([[float(g.double().norm() * d[i].double().norm()) for i, g in enumerate(grads)]
                          for d in diffs], dtype=torch.float64)  # fmt: skip
    if not layerwise:
        exact, norms = exact.sum(1, keepdim=True), norms.sum(1, keepdim=True)
    assert got.shape == exact.shape and got.dtype == torch.float32
    bound = 1e-6 * norms + 1e-30
    assert ((got.double().cpu() - exact).abs() <= bound).all(), (got, exact)
    assert ((got.double().cpu() - ref.double().cpu()).abs() <= bound).all(), (got, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("layerwise", [False, True])
def test_soup_combine_matches_fp64(backend: str, dtype, K: int, layerwise: bool, poison_alloc) -> None:  # noqa: F811
    need(backend)
    _check_combine(backend, SIZES, dtype, K, layerwise)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("layerwise", [False, True])
def test_soup_coef_grads_matches_fp64(backend: str, dtype, K: int, layerwise: bool, poison_alloc) -> None:  # noqa: F811
    need(backend)
    _check_grads(backend, SIZES, dtype, K, layerwise)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soup_big_many_and_twelve_ingredients(backend: str, poison_alloc) -> None:  # noqa: F811
    need(backend)
    sizes = [BIG, *many_sizes(100)]
    _check_combine(backend, sizes, torch.float32, 12, True)
    _check_grads(backend, sizes, torch.float32, 12, True)
    _check_grads(backend, sizes, torch.bfloat16, 2, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soup_mixed_dtypes_in_one_call(backend: str, poison_alloc) -> None:  # noqa: F811
    # tensors of different dtypes land in different launch groups; a layer keeps its own coefficient
    need(backend)
    from _kernel_cases import DEVICE

    base = [t.to(dt) for t, dt in zip(randn([7, 4097, 33]), (torch.float16, torch.float32, torch.bfloat16))]
    diffs = [[t.to(torch.float32 if i == 2 else b.dtype) for i, (t, b) in enumerate(zip(randn([7, 4097, 33]), base))]
             for _ in range(3)]  # fmt: skip
    coefs = torch.randn(3, 3, device=DEVICE)
    out = [torch.full(b.shape, float("nan"), dtype=torch.float32, device=DEVICE) for b in base]
    soup_combine_(out, base, diffs, coefs, backend=backend)
    for i, o in enumerate(out):
        exact = base[i].double() + sum(coefs[k, i].double() * d[i].double() for k, d in enumerate(diffs))
        torch.testing.assert_close(o.double(), exact, rtol=1e-5, atol=1e-5)
    got = soup_coef_grads(out, diffs, backend=backend)
    exact = torch.tensor([[float((o.double() * d[i].double()).sum()) for i, o in enumerate(out)] for d in diffs])
    torch.testing.assert_close(got.double().cpu(), exact.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soup_combine_in_place_on_base(backend: str) -> None:
    need(backend)
    base = randn([4097, 7])
    keep = [b.clone() for b in base]
    diffs = [randn([4097, 7]) for _ in range(2)]
    coefs = _coefs(2, 2, True)
    soup_combine_(base, base, diffs, coefs, backend=backend)
    for i, b in enumerate(base):
        exact = keep[i].double() + sum(coefs[k, i].double() * d[i].double() for k, d in enumerate(diffs))
        torch.testing.assert_close(b.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soup_coef_grads_deterministic(backend: str) -> None:
    need(backend)
    grads = randn([9001 * 3, 5, 20000])
    diffs = [randn([9001 * 3, 5, 20000]) for _ in range(3)]
    a = soup_coef_grads(grads, diffs, backend=backend)
    b = soup_coef_grads(grads, diffs, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soup_fp64_runs_on_the_reference(backend: str, kernel_calls) -> None:
    need(backend)
    kernel_calls.expect_reference()
    grads = [g.double() for g in randn([7, 33])]
    diffs = [[d.double() for d in randn([7, 33])] for _ in range(2)]
    got = soup_coef_grads(grads, diffs, backend=backend)
    assert got.dtype == torch.float64
    out = poisoned_like(grads)
    soup_combine_(out, grads, diffs, torch.ones(2, 1, dtype=torch.float64), backend=backend)
    torch.testing.assert_close(out[0], grads[0] + diffs[0][0] + diffs[1][0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layerwise", [False, True])
def test_mehl_soup_on_the_kernels_matches_the_reference(backend: str, layerwise: bool) -> None:
    # the soup's two hot passes run on the kernel backend; the learned soup is the reference's within rounding
    need(backend)
    from _kernel_cases import DEVICE
    from torch import nn

    from fastclu.soup import mehl_soup

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    w_true = torch.randn(3, 8, generator=g)
    x = torch.randn(90, 8, generator=g)
    y = (x @ w_true.t()).argmax(1)
    ings = [{"weight": w_true + s * torch.randn(3, 8, generator=g), "bias": s * torch.randn(3, generator=g)}
            for s in (0.3, 3.0, 0.5, 2.0)]  # fmt: skip
    batches = [(x[i : i + 30].to(DEVICE), y[i : i + 30].to(DEVICE)) for i in range(0, 90, 30)]
    models = [nn.Linear(8, 3).to(DEVICE) for _ in range(2)]
    kw = {"layerwise": layerwise, "block_size": 3, "epochs": 2, "steps_per_block": 4, "lr": 0.05}
    got = mehl_soup(models[0], ings, batches, backend=backend, **kw)
    want = mehl_soup(models[1], ings, batches, backend="reference", **kw)
    torch.testing.assert_close(torch.tensor(got.coefficients), torch.tensor(want.coefficients), rtol=1e-4, atol=1e-5)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
