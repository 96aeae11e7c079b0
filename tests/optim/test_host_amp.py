"""AMP finiteness of masked stashed roles from the gram diagonal (docs/DESIGN.md §4a').

A non-finite element the mask lets through skips the step; one under a zero mask bit does not;
a finite role whose squares overflow the fp32 gram diagonal does not either (the overflow is
told apart by the role holding no non-finite element at all).
"""

from __future__ import annotations

import pytest
import torch

from fastclu.optim import AdamW


def _setup(backend: str, value: float, masked_in: bool):
    g = torch.Generator().manual_seed(21)
    params = [torch.randn(s, generator=g).requires_grad_(True) for s in [(6, 5), (11,)]]
    keep = [torch.rand(p.shape, generator=g) > 0.4 for p in params]
    keep[0].view(-1)[3] = masked_in
    opt = AdamW(params, lr=0.1, backend=backend)
    opt.set_mask(keep, mode="grad", roles=["forget"])
    forget = [torch.randn(p.shape, generator=g) for p in params]
    forget[0].view(-1)[3] = value
    remain = [torch.randn(p.shape, generator=g) for p in params]
    return params, opt, forget, remain


def _scaled_step(params, opt, forget, remain, scale: float = 4.0) -> torch.Tensor:
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale(torch.ones(()))
    for p, f in zip(params, forget):
        p.grad = f * scale
    opt.stash("forget")
    for p, r in zip(params, remain):
        p.grad = r * scale
    scaler.step(opt, combine={"forget": -1.0, "grad": 1.0})
    return opt.last_found_inf


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(
    ("value", "masked_in", "skips"),
    [
        (float("inf"), True, True),
        (float("nan"), True, True),
        (float("inf"), False, False),
        (float("nan"), False, False),
        (3e19, True, False),  # finite; its square overflows the fp32 gram diagonal
    ],
)
def test_masked_role_finiteness(backend: str, value: float, masked_in: bool, skips: bool) -> None:
    params, opt, forget, remain = _setup(backend, value, masked_in)
    before = [p.detach().clone() for p in params]
    found = _scaled_step(params, opt, forget, remain)
    assert bool(found != 0) == skips
    moved = [not torch.equal(p, b) for p, b in zip(params, before)]
    if skips:
        assert not any(moved)
        assert all(torch.equal(opt.state[p]["exp_avg"], torch.zeros_like(p)) for p in params)
    else:
        assert all(moved)
        # the update is AdamW's on the masked combination (float64 formula, first step)
        for p, b, f, r, m in zip(params, before, forget, remain, _masks(opt, params)):
            fm = torch.where(m, f.double(), torch.zeros((), dtype=torch.float64))
            d = r.double() - fm
            upd = d / (d.abs() + 1e-8)  # first AdamW step: m_hat / (sqrt(v_hat) + eps)
            want = b.double() * (1 - 0.1 * 1e-2) - 0.1 * upd
            finite = torch.isfinite(want)
            torch.testing.assert_close(p.double()[finite], want[finite], rtol=1e-5, atol=1e-6)


def _masks(opt, params):
    from fastclu.ops import unpack_bits

    return [unpack_bits(opt.state[p]["mask"], p.numel()).reshape(p.shape) for p in params]
