"""EWC: the combined anchor against the sum of per-task penalties, and the method end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fastclu.methods.baselines import naive_sequential
from fastclu.methods.common import make_mlp
from fastclu.methods.ewc import _accumulate, _anchor, ewc


def _tasks(seed: int, n: int = 2) -> list[DataLoader]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n):
        x = torch.randn(48, 8, generator=g) + t
        y = (x[:, t] > t).long() + 2 * t
        out.append(DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False))
    return out


def test_separate_mode_anchor_equals_sum_of_task_penalties() -> None:
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    shapes = [(5, 4), (7,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    omega = f_theta = None
    fs, thetas = [], []
    for _ in range(3):
        f = [torch.rand(s, generator=g) * (torch.rand(s, generator=g) > 0.3) for s in shapes]
        th = [torch.randn(s, generator=g) for s in shapes]
        fs.append(f)
        thetas.append(th)
        omega, f_theta = _accumulate(omega, f_theta, f, th, "separate", 1.0)
    a = _anchor(omega, f_theta, params, "separate")
    for i, p in enumerate(params):
        want = sum(fs[t][i].double() * (p.double() - thetas[t][i].double()) for t in range(3))
        got = omega[i].double() * (p.double() - a[i].double())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_online_mode_decays_and_anchors_at_latest() -> None:
    shapes = [(3, 3)]
    f1, f2 = [torch.rand(3, 3)], [torch.rand(3, 3)]
    om, _ = _accumulate(None, None, f1, [torch.zeros(3, 3)], "online", 0.5)
    om, _ = _accumulate(om, None, f2, [torch.zeros(3, 3)], "online", 0.5)
    torch.testing.assert_close(om[0].double(), 0.5 * f1[0].double() + f2[0].double())
    here = [torch.randn(3, 3)]
    assert torch.equal(_anchor(om, None, here, "online")[0], here[0])
    assert shapes


def test_lam_zero_is_naive_bit_for_bit_and_lam_keeps_task0() -> None:
    base = make_mlp(8, (16,), 4, seed=3)
    m_naive, m0, m_ewc = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    naive_sequential(m_naive, _tasks(1), steps_per_task=20)
    r0 = ewc(m0, _tasks(1), steps_per_task=20, lam=0.0, fisher_samples=16)
    for a, b in zip(m_naive.parameters(), m0.parameters()):
        assert torch.equal(a, b)
    snaps = []
    ewc(m_ewc, _tasks(1), steps_per_task=20, lam=100.0, fisher_samples=16,
        after_task=lambda i, m: snaps.append([p.detach().clone() for p in m.parameters()]))  # fmt: skip
    # How far task 1 moved the weights from the task-0 optimum, weighted by task 0's Fisher.
    from fastclu.saliency import fisher

    m_t0 = copy.deepcopy(base)
    naive_sequential(m_t0, _tasks(1)[:1], steps_per_task=20)
    assert all(torch.equal(a, b) for a, b in zip(m_t0.parameters(), snaps[0]))
    f0 = fisher(m_t0.eval(), [(x[None], y[None]) for x, y in zip(*_tasks(1)[0].dataset.tensors)][:16],
                torch.nn.CrossEntropyLoss())  # fmt: skip

    def drift(m: torch.nn.Module) -> float:
        return float(sum((f * (p.detach() - q) ** 2).sum() for f, p, q in zip(f0, m.parameters(), snaps[0])))

    assert drift(m_ewc) < 0.5 * drift(m_naive)
    assert len(r0.info["fisher_trace"]) == 2 and all(t > 0 for t in r0.info["fisher_trace"])


def test_bad_arguments_and_nonfinite_fisher() -> None:
    m = make_mlp(8, (16,), 4, seed=0)
    with pytest.raises(ValueError, match="mode"):
        ewc(m, _tasks(0), mode="nope")
    with pytest.raises(ValueError, match="lam"):
        ewc(m, _tasks(0), lam=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        ewc(m, _tasks(0), gamma=2.0)
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="task 0"):
        ewc(m, _tasks(0), steps_per_task=0, fisher_samples=4)
