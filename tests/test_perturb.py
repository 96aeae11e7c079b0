"""fastclu.perturb: the perturbation context and the finite-difference Hessian-vector product."""

from __future__ import annotations

import pytest
import torch

import fastclu
from fastclu.perturb import default_hvp_eps, hvp, perturbed


def _mlp(dtype: torch.dtype, d_in: int = 7, d_hid: int = 13, d_out: int = 5) -> list[torch.Tensor]:
    ps = [torch.randn(d_hid, d_in) / d_in**0.5, torch.randn(d_hid) * 0.1,
          torch.randn(d_out, d_hid) / d_hid**0.5, torch.randn(d_out) * 0.1]  # fmt: skip
    return [p.to(dtype).requires_grad_() for p in ps]


def _loss_factory(params: list[torch.Tensor], n: int = 11):
    """A smooth loss (tanh MLP + cross-entropy) on a fixed random batch, in the params' dtype."""
    x = torch.randn(n, params[0].shape[1]).to(params[0].dtype)
    y = torch.randint(0, params[2].shape[0], (n,))

    def loss_at(ws: list[torch.Tensor]) -> torch.Tensor:
        h = torch.tanh(x.to(ws[0].dtype) @ ws[0].T + ws[1])
        return torch.nn.functional.cross_entropy(h @ ws[2].T + ws[3], y)

    return loss_at


def _autograd_hvp(params: list[torch.Tensor], loss_at, v: list[torch.Tensor]) -> list[torch.Tensor]:
    """Exact Hv by double backward, in float64 (the independent formulation)."""
    ws = [p.detach().double().requires_grad_() for p in params]
    g = torch.autograd.grad(loss_at(ws), ws, create_graph=True)
    dot = sum((gi * vi.double()).sum() for gi, vi in zip(g, v))
    return [h.detach() for h in torch.autograd.grad(dot, ws)]


def _rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(((x.double() - y.double()) ** 2).sum() for x, y in zip(a, b)) ** 0.5
    den = sum((y.double() ** 2).sum() for y in b) ** 0.5
    return float(num / den)


def test_hvp_exported_lazily_from_package() -> None:
    assert fastclu.hvp is hvp


def test_hvp_matches_double_backward_float64() -> None:
    params = _mlp(torch.float64)
    loss_at = _loss_factory(params)
    v = [torch.randn_like(p) for p in params]
    got = hvp(params, lambda: loss_at(params), v)
    want = _autograd_hvp(params, loss_at, v)
    err = _rel_err(got, want)
    print(f"hvp relative error, float64: {err:.3e}")
    assert err < 1e-6  # measured over 300 seeds: median 5e-11, max 2e-10; the issue asks < 1e-3
    assert all(g.dtype == torch.float64 and g.shape == p.shape for g, p in zip(got, params))


def test_hvp_float32_stated_bound() -> None:
    # Stated bound for fp32 weights with the default eps: 1e-3 relative. Measured over 300
    # seeds on this MLP: median 3.5e-5, max 2.7e-4. Reference: exact fp64 Hv of the same weights.
    params = _mlp(torch.float32)
    loss_at = _loss_factory(params)
    v = [torch.randn_like(p) for p in params]
    got = hvp(params, lambda: loss_at(params), v)
    err = _rel_err(got, _autograd_hvp(params, loss_at, v))
    print(f"hvp relative error, float32: {err:.3e}")
    assert err < 1e-3
    assert all(g.dtype == torch.float32 for g in got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_hvp_restores_weights_bit_exactly(dtype: torch.dtype) -> None:
    params = _mlp(dtype)
    loss_at = _loss_factory(params)
    before = [p.detach().clone() for p in params]
    seen: list[list[torch.Tensor]] = []

    def loss_fn() -> torch.Tensor:
        seen.append([p.detach().clone() for p in params])
        return loss_at(params)

    v = [torch.randn_like(p) for p in params]
    eps = 0.01
    out = hvp(params, loss_fn, v, eps=eps)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert all(p.grad is None for p in params)  # autograd.grad, not .backward
    # Exactly two calls: first at theta + eps v, then at theta - eps v (rounded once each).
    assert len(seen) == 2
    for sign, ws in zip((1.0, -1.0), seen):
        for w, b, d in zip(ws, before, v):
            want = (b.double() + sign * eps * d.double()).to(dtype)
            torch.testing.assert_close(
                w, want, rtol=0, atol=float(torch.finfo(dtype).eps) * 4 * float(want.abs().max())
            )
    want_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    assert all(o.dtype == want_dtype and torch.isfinite(o).all() for o in out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fail_on", [1, 2])
def test_hvp_restores_when_loss_raises(dtype: torch.dtype, fail_on: int) -> None:
    params = _mlp(dtype)
    loss_at = _loss_factory(params)
    before = [p.detach().clone() for p in params]
    calls = []

    def loss_fn() -> torch.Tensor:
        calls.append(1)
        if len(calls) == fail_on:
            raise KeyError("boom")
        return loss_at(params)

    with pytest.raises(KeyError, match="boom"):
        hvp(params, loss_fn, [torch.randn_like(p) for p in params])
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_hvp_zero_direction_and_unused_param() -> None:
    params = _mlp(torch.float64)
    unused = torch.randn(3, dtype=torch.float64, requires_grad=True)
    loss_at = _loss_factory(params)
    out = hvp([*params, unused], lambda: loss_at(params), [torch.zeros_like(p) for p in [*params, unused]])
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out)
    v = [torch.randn_like(p) for p in [*params, unused]]
    out = hvp([*params, unused], lambda: loss_at(params), v)
    assert torch.equal(out[-1], torch.zeros_like(unused))
    assert _rel_err(out[:-1], _autograd_hvp(params, loss_at, v[:-1])) < 1e-6


def test_hvp_explicit_eps_and_linearity() -> None:
    params = _mlp(torch.float64)
    loss_at = _loss_factory(params)
    v = [torch.randn_like(p) for p in params]
    a = hvp(params, lambda: loss_at(params), v, eps=1e-5)
    b = hvp(params, lambda: loss_at(params), [2.0 * x for x in v], eps=torch.tensor(5e-6, dtype=torch.float64))
    assert _rel_err(b, [2.0 * x for x in a]) < 1e-6


def test_default_eps_formula() -> None:
    params = _mlp(torch.float32)
    v = [torch.randn_like(p) for p in params]
    theta = torch.cat([p.detach().double().reshape(-1) for p in params]).norm()
    vn = torch.cat([x.double().reshape(-1) for x in v]).norm()
    want = (2.0**-24) ** (1 / 3) * (1 + theta) / vn
    torch.testing.assert_close(default_hvp_eps(params, v), want, rtol=1e-12, atol=0)
    p64 = [p.detach().double() for p in params]
    want64 = (2.0**-53) ** (1 / 3) * (1 + theta) / vn
    torch.testing.assert_close(default_hvp_eps(p64, v), want64, rtol=1e-12, atol=0)


def test_hvp_rejects_bad_input_without_touching_weights() -> None:
    params = _mlp(torch.float32)
    loss_at = _loss_factory(params)
    before = [p.detach().clone() for p in params]
    good_v = [torch.randn_like(p) for p in params]
    with pytest.raises(ValueError, match="v has"):
        hvp(params, lambda: loss_at(params), good_v[:-1])
    with pytest.raises(ValueError, match=r"v\[1\]"):
        hvp(params, lambda: loss_at(params), [good_v[0], torch.randn(3), *good_v[2:]])
    with pytest.raises(TypeError, match="loss_fn"):
        hvp(params, 3.0, good_v)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        hvp(params, lambda: loss_at(params), good_v, eps=0.0)
    with pytest.raises(TypeError, match="eps"):
        hvp(params, lambda: loss_at(params), good_v, eps="1e-3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="params"):
        hvp(params[0], lambda: loss_at(params), good_v)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="require"):
        hvp([p.detach() for p in params], lambda: loss_at(params), good_v)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_context_moves_and_restores(dtype: torch.dtype) -> None:
    ps = [torch.randn(6, 5).to(dtype), torch.randn(4).to(dtype)]
    anchor = [torch.randn_like(p) for p in ps]
    before = [p.clone() for p in ps]
    with perturbed(ps, 0.5, anchor=anchor) as norms:
        assert norms is None
        for p, b, a in zip(ps, before, anchor):
            want = (b.float() + 0.5 * (b.float() - a.float())).to(dtype)
            torch.testing.assert_close(p, want, rtol=0, atol=0)
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    with pytest.raises(ZeroDivisionError), perturbed(ps, 0.3, seed=7) as norms:
        assert norms is not None and len(norms) == 2
        assert not torch.equal(ps[0], before[0])
        raise ZeroDivisionError
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
