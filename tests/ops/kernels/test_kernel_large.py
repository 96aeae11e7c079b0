"""GPU-only large cases: sizes up to 2**28 against the reference, and one tensor of more than
2**31 elements for the elementwise ops (64-bit offsets), checked on windows around 2**31."""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import BACKENDS, DEVICE, assert_close, assert_equal, need

import fastclu.ops as O

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

HUGE = 2**31 + 4099
W = 4096
WINDOWS = [slice(0, W), slice(2**31 - W // 2, 2**31 + W // 2), slice(HUGE - W, HUGE)]


def _free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / 2**30 if torch.cuda.is_available() else 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2**20 + 3, 2**24 + 1, 2**28])
def test_large_elementwise_and_reductions(backend: str, n: int) -> None:
    need(backend)
    x, y = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    f = torch.rand(n, device=DEVICE)
    for op in ("fisher", "merge"):
        got, want = [f.clone()], [f.clone()]
        if op == "fisher":
            O.fisher_accumulate_(got, [x], 0.5, backend=backend)
            O.fisher_accumulate_(want, [x], 0.5, backend="reference")
        else:
            O.merge_(got, [y], 0.3, backend=backend)
            O.merge_(want, [y], 0.3, backend="reference")
        assert_close(got, want, torch.float32)
    g = O.gram([[x], [y]], backend=backend)
    r = O.gram([[x], [y]], backend="reference")
    bound = 1e-6 * (r.diagonal()[:, None] * r.diagonal()[None, :]).sqrt()
    assert ((g - r).abs() <= bound).all()
    k = n // 3
    assert_equal(O.topk_mask([x, y], k, backend=backend), O.topk_mask([x, y], k, backend="reference"))
    got = O.ratio_mask([f], [x.abs()], 0.9, backend=backend)
    assert_equal(got, O.ratio_mask([f], [x.abs()], 0.9, backend="reference"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_combine_adamw_2_28(backend: str) -> None:
    need(backend)
    n = 2**28
    p, g = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    st = {"exp_avg": [torch.zeros(n, device=DEVICE)], "exp_avg_sq": [torch.zeros(n, device=DEVICE)],
          "step": [torch.zeros((), device=DEVICE)]}  # fmt: skip
    ref_p, ref_st = [p.clone()], {k: [v[0].clone()] for k, v in st.items()}
    O.combine_step_([p], [[g]], st, rule="adamw", lr=1e-3, weight_decay=0.01, backend=backend)
    O.combine_step_(ref_p, [[g]], ref_st, rule="adamw", lr=1e-3, weight_decay=0.01, backend="reference")
    assert_close([p], ref_p, torch.float32)
    assert_close(st["exp_avg_sq"], ref_st["exp_avg_sq"], torch.float32)


def _windows(t: torch.Tensor) -> list[torch.Tensor]:
    return [t[w].clone() for w in WINDOWS]


@pytest.mark.parametrize("backend", BACKENDS)
def test_over_2_31_elements_elementwise(backend: str) -> None:
    """fp16 tensors of 2**31 + 4099 elements: each op's result checked on windows past 2**31."""
    need(backend)
    if _free_gib() < 40:
        pytest.skip(f"needs ~40 GiB of free GPU memory, {_free_gib():.0f} GiB free")
    dt = torch.float16
    p = torch.randn(HUGE, device=DEVICE, dtype=dt)
    q = torch.randn(HUGE, device=DEVICE, dtype=dt)

    # merge_: theta = anchor + alpha (theta - anchor)
    before = _windows(p)
    O.merge_([p], [q], 0.25, backend=backend)
    want = [w.clone() for w in before]
    O.merge_(want, _windows(q), 0.25, backend="reference")
    assert_close(_windows(p), want, dt)

    # perturb_ with a direction and a backup, then the bit-exact restore
    backup = torch.full_like(p, float("nan"))
    before = _windows(p)
    O.perturb_([p], 0.5, direction=[q], backup=[backup], backend=backend)
    want = [w.clone() for w in before]
    O.perturb_(want, 0.5, direction=_windows(q), backend="reference")
    assert_close(_windows(p), want, dt)
    assert_equal(_windows(backup), before)
    O.restore_([p], [backup], backend=backend)
    assert_equal(_windows(p), before)
    del backup

    # lerp_sync_: both written
    before_s, before_f = _windows(p), _windows(q)
    O.lerp_sync_([p], [q], 0.5, backend=backend)
    ws, wf = [w.clone() for w in before_s], [w.clone() for w in before_f]
    O.lerp_sync_(ws, wf, 0.5, backend="reference")
    assert_close(_windows(p), ws, dt)
    assert_close(_windows(q), wf, dt)

    # fd_hvp_ into a poisoned output
    out = torch.full_like(p, float("nan"))
    q.normal_()
    O.fd_hvp_([out], [p], [q], 0.5, backend=backend)
    want = [torch.empty_like(w) for w in _windows(p)]
    O.fd_hvp_(want, _windows(p), _windows(q), 0.5, backend="reference")
    assert_close(_windows(out), want, dt, scale=4.0)
    del out

    # combine_step_ (SGD + momentum; fp32 state) on the same huge tensor
    buf = torch.randn(HUGE, device=DEVICE)
    bp, bb = _windows(p), _windows(buf)
    O.combine_step_([p], [[q]], {"momentum_buffer": [buf]}, lr=0.1, momentum=0.9, backend=backend)
    O.combine_step_(bp, [_windows(q)], {"momentum_buffer": bb}, lr=0.1, momentum=0.9, backend="reference")
    assert_close(_windows(p), bp, dt)
    assert_close(_windows(buf), bb, torch.float32)
