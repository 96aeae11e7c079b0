"""fastclu.merge: P&M coefficient, merge and running Fisher sums against direct fp64 formulas."""

from __future__ import annotations

import pytest
import torch

from fastclu.merge import accumulate_task_, merge_coefficient, merge_sums, merge_task_

SHAPES = [(7, 3), (11,), (2, 3, 4), (0,)]


def _case(dtype: torch.dtype = torch.float32, tasks: int = 3):
    """Random task optima and positive Fishers; returns (theta, anchor, S_F, S_Ftheta) and fp64 inputs."""
    fishers = [[torch.rand(s) + 0.05 for s in SHAPES] for _ in range(tasks)]
    optima = [[torch.randn(s).to(dtype) for s in SHAPES] for _ in range(tasks)]
    anchor = [torch.randn(s).to(dtype) for s in SHAPES]
    s_f = [sum(f[i] for f in fishers) for i in range(len(SHAPES))]
    s_ft = [sum(f[i] * o[i].float() for f, o in zip(fishers, optima)) for i in range(len(SHAPES))]
    theta = [o.clone() for o in optima[-1]]
    return theta, anchor, s_f, s_ft


def _alpha64(theta, anchor, s_f, s_ft) -> float:
    num = den = 0.0
    for p, a, f, ft in zip(theta, anchor, s_f, s_ft):
        d = p.double() - a.double()
        num += float((d * (ft.double() - a.double() * f.double())).sum())
        den += float((d * d * f.double()).sum())
    return min(max(num / den, 0.0), 1.0)


def test_merge_sums_and_coefficient_match_fp64() -> None:
    theta, anchor, s_f, s_ft = _case()
    num, den = merge_sums(theta, anchor, s_f, s_ft)
    want_num = sum(float(((p.double() - a.double()) * (ft.double() - a.double() * f.double())).sum())
                   for p, a, f, ft in zip(theta, anchor, s_f, s_ft))  # fmt: skip
    torch.testing.assert_close(num.double(), torch.tensor(want_num, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert den > 0
    alpha = merge_coefficient(theta, anchor, s_f, s_ft)
    assert alpha.dtype == torch.float32 and alpha.dim() == 0
    assert abs(float(alpha) - _alpha64(theta, anchor, s_f, s_ft)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_task_updates_weights(dtype: torch.dtype) -> None:
    theta, anchor, s_f, s_ft = _case(dtype)
    before = [p.clone() for p in theta]
    alpha = merge_task_(theta, anchor, s_f, s_ft)
    a64 = float(alpha)
    for p, b, an in zip(theta, before, anchor):
        want = an.double() + a64 * (b.double() - an.double())
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(p.double(), want, rtol=tol, atol=tol)
        assert p.dtype == dtype


def test_coefficient_clamps_and_handles_flat_segment() -> None:
    ps = [torch.randn(5, 4)]
    anchor = [torch.randn(5, 4)]
    f = [torch.rand(5, 4) + 0.1]
    # All mass at the anchor (S_Ftheta = anchor * S_F): alpha -> 0 exactly.
    assert float(merge_coefficient(ps, anchor, f, [anchor[0] * f[0]])) == pytest.approx(0.0, abs=1e-6)
    # Optimum far beyond theta along delta: clamped to 1.
    far = [anchor[0] + 3.0 * (ps[0] - anchor[0])]
    assert float(merge_coefficient(ps, anchor, f, [far[0] * f[0]])) == 1.0
    # Optimum behind the anchor: clamped to 0.
    behind = [anchor[0] - 2.0 * (ps[0] - anchor[0])]
    assert float(merge_coefficient(ps, anchor, f, [behind[0] * f[0]])) == 0.0
    # delta == 0: flat segment, alpha = 1 (keep the weights), no NaN.
    assert float(merge_coefficient(anchor, anchor, f, [ps[0] * f[0]])) == 1.0
    # No Fisher mass: alpha = 1.
    assert float(merge_coefficient(ps, anchor, [torch.zeros(5, 4)], [torch.zeros(5, 4)])) == 1.0


def test_accumulate_task_matches_direct_sums() -> None:
    params = [torch.randn(s) for s in SHAPES]
    fisher = [torch.rand(s) for s in SHAPES]
    s_f = [torch.rand(s) for s in SHAPES]
    s_ft = [torch.randn(s) for s in SHAPES]
    want_f = [a.double() + 0.25 * f.double() for a, f in zip(s_f, fisher)]
    want_ft = [a.double() + 0.25 * f.double() * p.double() for a, f, p in zip(s_ft, fisher, params)]
    accumulate_task_(s_f, s_ft, fisher, params, scale=0.25)
    for got, want in zip(s_f + s_ft, want_f + want_ft):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_merge_rejects_misaligned_lists() -> None:
    theta, anchor, s_f, s_ft = _case()
    before = [p.clone() for p in theta]
    with pytest.raises(ValueError, match="anchor"):
        merge_task_(theta, anchor[:-1], s_f, s_ft)
    with pytest.raises(ValueError, match="fisher_sum"):
        merge_task_(theta, anchor, [torch.rand(2), *s_f[1:]], s_ft)
    assert all(torch.equal(p, b) for p, b in zip(theta, before))
