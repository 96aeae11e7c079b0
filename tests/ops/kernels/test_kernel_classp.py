"""The CLASSP rule on the kernel backends against a float64 formula (not the reference).

Fresh random weights, accumulators and gradients each run; several steps so ``acc`` grows; the
weights are stored in their dtype after each step, as the formula's weights are. Non-finite
gradients fail the gate; with ``apply_scaling=False`` the (NaN-poisoned) ``acc`` is never touched.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _kernel_cases import BACKENDS, DEVICE, FLOATS, SIZES, TOL, need, poison_alloc, rand, randn  # noqa: F401

from fastclu.ops import combine_step_

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
from test_ref_classp import away_from_gate, formula

CASES = [(1.0, True), (2.0, True), (1.5, True), (1.0, False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("power,scaling", CASES)
def test_classp_matches_float64_formula(backend, dtype, power, scaling, poison_alloc) -> None:  # noqa: F811
    need(backend)
    thr, eps, lr = 0.3, 0.05, 0.1  # eps large enough to matter at the tolerance
    params = randn(SIZES, dtype)
    acc = rand(SIZES, lo=0.0, hi=1.5)
    steps = [torch.tensor(float(torch.randint(0, 9, ())), device=DEVICE) for _ in SIZES]
    steps0 = [float(s) for s in steps]
    want = [(p.double(), a.double()) for p, a in zip(params, acc)]
    state = {"acc": acc, "step": steps}
    for _ in range(3):
        grads = [away_from_gate(g, thr) for g in randn(SIZES, dtype, scale=1.2)]
        combine_step_(params, [grads], state, rule="classp", lr=lr, threshold=thr, power=power, eps=eps,
                      apply_scaling=scaling, backend=backend)  # fmt: skip
        want = [formula(t, g, a, lr, thr, eps, power, scaling) for (t, a), g in zip(want, grads)]
        want = [(t.to(dtype).double(), a) for t, a in want]  # weights stored in their dtype
    rtol, atol = TOL[dtype]
    if dtype != torch.float32:
        # each of the 3 stores may land an ulp of dtype apart (the interpreter truncates casts),
        # and the next step starts from there
        rtol, atol = 3 * rtol, 3 * atol
    for p, a, (wt, wa) in zip(params, state["acc"], want):
        torch.testing.assert_close(p.double(), wt, rtol=rtol, atol=atol)
        torch.testing.assert_close(a.double(), wa, rtol=1e-5, atol=1e-5)
    assert [float(s) for s in steps] == [s + 3 for s in steps0]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # -inf / inf, on purpose
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("power", [1.0, 2.0, 1.5])
def test_non_finite_gradients_and_untouched_acc(backend, power) -> None:
    need(backend)
    sizes = [4097, 7]
    params = randn(sizes, torch.float32)
    grads = randn(sizes, torch.float32, scale=1.5)
    for g in grads:
        g[::3] = float("nan")
        g[1::7] = float("-inf")
    before = [p.clone() for p in params]
    acc = [torch.rand_like(p) for p in params]
    state = {"acc": acc, "step": [torch.zeros((), device=DEVICE) for _ in sizes]}
    combine_step_(params, [grads], state, rule="classp", lr=0.1, power=power, backend=backend)
    for p, b, g, a in zip(params, before, grads, acc):
        on = g * g > 0.5  # NaN: False; -inf: True (and then acc = inf, the step -lr * g / inf)
        assert torch.equal(p[~on], b[~on]), "a weight whose gradient fails the gate moved"
        assert torch.isfinite(p[~on]).all()
        assert torch.isinf(a[on & torch.isinf(g)]).all()
    # without scaling acc is not read or written: NaN there changes nothing
    params = randn(sizes, torch.float32)
    poisoned = [torch.full_like(p, float("nan")) for p in params]
    grads = randn(sizes, torch.float32, scale=1.5)
    want = [torch.where(g * g > 0.5, p.double() - 0.1 * g.double(), p.double()) for p, g in zip(params, grads)]
    state = {"acc": poisoned, "step": [torch.zeros((), device=DEVICE) for _ in sizes]}
    combine_step_(params, [grads], state, rule="classp", lr=0.1, apply_scaling=False, backend=backend)
    for p, w, a in zip(params, want, poisoned):
        torch.testing.assert_close(p.double(), w, rtol=2e-6, atol=2e-6)
        assert torch.isnan(a).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_on_the_kernels_with_roles_mask_clip_and_a_checkpoint(backend) -> None:
    """fastclu.optim.CLASSP on a kernel backend against itself on the reference: stashed roles,
    an update-mode mask, the clip, and a state_dict taken mid-run loaded into a fresh optimizer."""
    need(backend)
    from fastclu.optim import CLASSP

    shapes = [(33, 5), (7,), (4097,)]
    init = [torch.randn(s, device=DEVICE) for s in shapes]
    masks = [torch.rand(s, device=DEVICE) < 0.7 for s in shapes]
    grads = [[[torch.randn(s, device=DEVICE) * 1.5 for s in shapes] for _ in range(2)] for _ in range(4)]

    def run(b: str) -> tuple[list[torch.Tensor], dict]:
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = CLASSP(params, lr=0.1, threshold=0.2, power=2.0, backend=b)
        opt.set_mask(masks, mode="update")
        for k, (forget, grad) in enumerate(grads):
            if k == 2:  # resume from a checkpoint in a fresh optimizer
                sd = opt.state_dict()
                opt = CLASSP(params, lr=0.1, threshold=0.2, power=2.0, backend=b)
                opt.load_state_dict(sd)
            for p, g in zip(params, forget):
                p.grad = g.clone()
            opt.stash("forget")
            for p, g in zip(params, grad):
                p.grad = g.clone()
            opt.step(combine={"grad": 1.0, "forget": -0.5}, clip=5.0)
        return [p.detach() for p in params], opt.state_dict()

    got, sd_got = run(backend)
    want, sd_want = run("reference")
    for a, b, m, t0 in zip(got, want, masks, init):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert torch.equal(a[~m], t0[~m]), "masked-out weights moved in update mode"
    for i in range(len(shapes)):
        torch.testing.assert_close(sd_got["state"][i]["acc"], sd_want["state"][i]["acc"], rtol=1e-5, atol=1e-6)
        assert float(sd_got["state"][i]["step"]) == 4.0
