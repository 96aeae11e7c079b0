"""MEHL-Soup: the combination and coefficient gradients against float64 formulas; end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastclu.soup import _coef_grads, _compose_, mehl_soup, uniform_soup


def _seed() -> int:
    return int(torch.randint(0, 2**31, (1,)))


@pytest.mark.parametrize("layerwise", [False, True])
def test_compose_and_coefficient_grads_match_float64(layerwise: bool) -> None:
    g = torch.Generator().manual_seed(_seed())
    shapes = [(5, 7), (7,), (3, 2, 2)]
    c = [torch.randn(s, generator=g) for s in shapes]
    diffs = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    x = torch.randn(3, len(shapes) if layerwise else 1, generator=g)
    out = [torch.full(s, float("nan")) for s in shapes]  # poisoned
    _compose_(out, c, diffs, x)
    for i, o in enumerate(out):
        want = c[i].double() + sum(x[k, i if layerwise else 0].double() * diffs[k][i].double() for k in range(3))
        torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-5)
    grads = [torch.randn(s, generator=g) for s in shapes]
    got = _coef_grads(grads, diffs, layerwise)
    want = torch.tensor([[float((grads[i].double() * diffs[k][i].double()).sum()) for i in range(len(shapes))]
                         for k in range(3)], dtype=torch.float64)  # fmt: skip
    if not layerwise:
        want = want.sum(1, keepdim=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_coefficient_grads_equal_autograd_through_the_soup() -> None:
    g = torch.Generator().manual_seed(_seed())
    model = nn.Linear(6, 3).double()
    params = list(model.parameters())
    c = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    diffs = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params] for _ in range(2)]
    x = torch.randn(2, 2, generator=g, dtype=torch.float64)
    xb, yb = torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)
    with torch.no_grad():
        _compose_(params, c, diffs, x)
    F.cross_entropy(model(xb), yb).backward()
    got = _coef_grads([p.grad for p in params], diffs, True)
    xr = x.clone().requires_grad_(True)
    w = c[0] + xr[0, 0] * diffs[0][0] + xr[1, 0] * diffs[1][0]
    b = c[1] + xr[0, 1] * diffs[0][1] + xr[1, 1] * diffs[1][1]
    F.cross_entropy(xb @ w.t() + b, yb).backward()
    torch.testing.assert_close(got, xr.grad, rtol=1e-10, atol=1e-12)


def _problem(seed: int, k: int = 6) -> tuple[nn.Module, list[dict], DataLoader]:
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(3, 8, generator=g)
    x = torch.randn(120, 8, generator=g)
    y = (x @ w_true.t()).argmax(1)
    ingredients = []
    for j in range(k):
        noise = 0.3 if j % 2 == 0 else 3.0  # good and bad fine-tunes
        ingredients.append({"weight": w_true + noise * torch.randn(3, 8, generator=g),
                            "bias": noise * torch.randn(3, generator=g)})  # fmt: skip
    return nn.Linear(8, 3), ingredients, DataLoader(TensorDataset(x, y), batch_size=40)


@pytest.mark.parametrize("layerwise", [False, True])
def test_mehl_soup_end_to_end_weights_describe_the_soup(layerwise: bool, tmp_path) -> None:
    model, ings, ld = _problem(_seed())
    res = mehl_soup(model, ings, ld, layerwise=layerwise, block_size=2, epochs=2, steps_per_block=8, lr=0.05)
    w = torch.tensor(res.coefficients, dtype=torch.float64)
    assert w.shape == (6, 2 if layerwise else 1)
    torch.testing.assert_close(w.sum(0), torch.ones(w.shape[1], dtype=torch.float64), rtol=0, atol=1e-9)
    for li, (name, p) in enumerate(model.named_parameters()):
        col = li if layerwise else 0
        want = sum(w[k, col] * ings[k][name].double() for k in range(6))
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-4, atol=1e-5)
    assert res.info["peak_held_bytes"] < res.info["all_loaded_bytes"]
    # Learned beats uniform on the held-out loss it was fit on.
    x, y = ld.dataset.tensors
    uni = nn.Linear(8, 3)
    uniform_soup(uni, ings)
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) < float(F.cross_entropy(uni(x), y))
    # Ingredients from memory-mapped files give the same soup.
    paths = []
    for j, sd in enumerate(ings):
        paths.append(tmp_path / f"ing{j}.pt")
        torch.save(sd, paths[-1])
    model2 = nn.Linear(8, 3)
    res2 = mehl_soup(model2, paths, ld, layerwise=layerwise, block_size=2, epochs=2, steps_per_block=8, lr=0.05)
    assert res2.coefficients == res.coefficients
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_bad_arguments() -> None:
    model, ings, ld = _problem(0, 2)
    with pytest.raises(ValueError, match="block_size"):
        mehl_soup(model, ings, ld, block_size=0)
    with pytest.raises(ValueError, match="empty"):
        mehl_soup(model, [], ld)
    with pytest.raises(KeyError, match="lacks"):
        mehl_soup(model, [{"weight": torch.zeros(3, 8)}], ld)
    with pytest.raises(TypeError, match="ingredient"):
        mehl_soup(model, [3], ld)


def test_block_size_above_the_fused_limit_is_refused() -> None:
    model, ings, ld = _problem(0, 2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="block_size must be <= 12"):
        mehl_soup(model, ings, ld, block_size=13)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
