"""The reference CLASSP rule (``update`` and ``update_foreach``) against a float64 formula.

The formula is written here, element by element from the paper's rule (arXiv 2405.09637), on
fresh random data; the rule under test computes in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import pytest
import torch

from fastclu import ops
from fastclu.ops.reference.rules import classp
from fastclu.ops.rules import StepConfig

SHAPES = [(7, 5), (13,), (), (0,), (3, 1, 4), (33,)]


def formula(theta, g, acc, lr, thr, eps, p, scaling):
    """One CLASSP step in float64, one weight at a time: ``(theta, acc)`` after it."""
    theta, acc = theta.double().flatten().tolist(), acc.double().flatten().tolist()
    for j, gj in enumerate(g.double().flatten().tolist()):
        if gj * gj > thr:  # a NaN gradient fails the comparison
            if scaling:
                acc[j] += abs(gj) ** p
                theta[j] -= lr * gj / (acc[j] + eps) ** (1.0 / p)
            else:
                theta[j] -= lr * gj
    shape = g.shape
    f64 = torch.float64
    return torch.tensor(theta, dtype=f64).reshape(shape), torch.tensor(acc, dtype=f64).reshape(shape)


def away_from_gate(g: torch.Tensor, thr: float) -> torch.Tensor:
    """``g`` nudged where ``g * g`` is within 1e-4 of the threshold (fp32 vs fp64 rounding there
    could decide the gate either way, which is not what these tests are about)."""
    near = ((g.double() ** 2 - thr).abs() < 1e-4 * max(thr, 1.0)) & (g != 0)
    return torch.where(near, g * 1.05, g)


CASES = [(1.0, True), (2.0, True), (1.5, True), (1.0, False)]


@pytest.mark.parametrize("power,scaling", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", ["update", "update_foreach"])
def test_rule_matches_float64_formula(power, scaling, dtype, form) -> None:
    thr, eps = 0.4, 0.05  # eps large enough to matter at the tolerance
    lr = 0.15
    cfg = StepConfig("classp", lr, threshold=thr, power=power, eps=eps, apply_scaling=scaling)
    thetas = [torch.randn(s, dtype=dtype) for s in SHAPES]
    accs = [torch.rand(s, dtype=dtype) for s in SHAPES]  # a state that has grown already
    steps = [torch.tensor(float(torch.randint(0, 9, ()))) for _ in SHAPES]
    want = [(t.double(), a.double()) for t, a in zip(thetas, accs)]
    steps0 = [float(s) for s in steps]
    for _ in range(3):
        gs = [away_from_gate(torch.randn(s, dtype=dtype) * 1.3, thr) for s in SHAPES]
        want = [formula(t, g, a, lr, thr, eps, power, scaling) for (t, a), g in zip(want, gs)]
        if form == "update":
            for t, g, a, s in zip(thetas, gs, accs, steps):
                classp.update(t, g, {"acc": a}, s, cfg)
        else:
            classp.update_foreach(thetas, gs, {"acc": accs}, steps, cfg)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for t, a, (wt, wa) in zip(thetas, accs, want):
        torch.testing.assert_close(t.double(), wt, rtol=tol, atol=tol)
        torch.testing.assert_close(a.double(), wa, rtol=tol, atol=tol)
    assert [float(s) for s in steps] == [s + 3 for s in steps0]


@pytest.mark.parametrize("form", ["update", "update_foreach"])
def test_nan_and_gated_out_gradients_move_nothing(form) -> None:
    cfg = StepConfig("classp", torch.tensor(0.2), threshold=0.5, power=2.0)
    theta, acc = torch.randn(64), torch.rand(64)
    g = torch.randn(64)
    g[::5] = float("nan")
    t0, a0 = theta.clone(), acc.clone()
    if form == "update":
        classp.update(theta, g, {"acc": acc}, torch.tensor(0.0), cfg)
    else:
        classp.update_foreach([theta], [g], {"acc": [acc]}, [torch.tensor(0.0)], cfg)
    still = ~(g * g > 0.5)
    assert 10 < int(still.sum()) < 64
    assert torch.equal(theta[still], t0[still]) and torch.equal(acc[still], a0[still])
    assert torch.isfinite(theta).all() and bool((theta[~still] != t0[~still]).all())


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_through_the_op_with_roles_mask_penalty(mode) -> None:
    """combine_step_(rule="classp") on the reference backend: the prologue's g, then the formula."""
    shapes = [s for s in SHAPES if s != ()]
    params = [torch.randn(s) for s in shapes]
    g0, g1 = ([torch.randn(s) for s in shapes] for _ in range(2))
    imp, anc = [torch.rand(s) for s in shapes], [torch.randn(s) for s in shapes]
    bits = [torch.rand(s) < 0.6 for s in shapes]
    acc = [torch.rand(s) for s in shapes]
    steps = [torch.tensor(2.0) for _ in shapes]
    want = []
    for i in range(len(shapes)):
        gated = torch.where(bits[i], g0[i], 0.0) if mode == "grad" else g0[i]
        g = (gated.double() * 1.5 - 0.5 * g1[i].double()) * 0.8
        g = g + 0.3 * imp[i].double() * (params[i].double() - anc[i].double())
        g = -g  # maximize
        t, a = formula(params[i], g, acc[i], 0.1, 0.2, 1e-5, 1.5, True)
        if mode == "update":
            t = torch.where(bits[i], t, params[i].double())
            a = torch.where(bits[i], a, acc[i].double())
        want.append((t, a))
    state = {"acc": [a.clone() for a in acc], "step": steps}
    ops.combine_step_(params, [g0, g1], state, rule="classp", lr=0.1, coeffs=[1.5, -0.5], scale=0.8,
                      mask=[ops.pack_bits(b) for b in bits], masked=[True, False], mask_mode=mode, penalty=0.3,
                      importance=imp, anchor=anc, maximize=True, threshold=0.2, power=1.5, eps=1e-5,
                      backend="reference")  # fmt: skip
    for p, a, (wt, wa) in zip(params, state["acc"], want):
        torch.testing.assert_close(p.double(), wt, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.double(), wa, rtol=1e-5, atol=1e-6)
    assert all(float(s) == 3.0 for s in steps)


def test_bad_hyperparameters_are_refused_before_anything_moves() -> None:
    p = [torch.randn(4)]
    st = {"acc": [torch.zeros(4)], "step": [torch.zeros(())]}
    before = p[0].clone()
    for kw, match in (({"power": 0.0}, "power"), ({"threshold": -1.0}, "threshold"),
                      ({"threshold": float("inf")}, "threshold"), ({"eps": -1.0}, "eps")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ops.combine_step_(p, [[torch.randn(4)]], st, rule="classp", lr=0.1, **kw)
    with pytest.raises(ValueError, match="state is missing 'acc'"):
        ops.combine_step_(p, [[torch.randn(4)]], {"step": st["step"]}, rule="classp", lr=0.1)
    assert torch.equal(p[0], before) and float(st["step"][0]) == 0.0
