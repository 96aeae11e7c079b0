"""channels_last and other non-contiguous (dense) parameters: same numbers as torch.optim, masks by logical element."""

from __future__ import annotations

import copy

import pytest
import torch

import fastclu.optim as fo
from fastclu.saliency import SaliencyMask


@pytest.fixture(autouse=True)
def _unfused(monkeypatch):
    # The bit-for-bit comparisons with torch's foreach=False step are about the reference's
    # formulation without torch's fused kernel (test_parity.py checks it against fused=True).
    monkeypatch.setenv("FASTCLU_REFERENCE_FUSED", "0")


def _cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU(), torch.nn.Conv2d(5, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 3)
    )  # fmt: skip
    net = net.to(memory_format=torch.channels_last)
    with torch.no_grad():  # a transposed (non-contiguous, dense) weight too
        net[4].weight = torch.nn.Parameter(net[4].weight.detach().t().contiguous().t())
    return net


@pytest.mark.parametrize(
    ("ours", "theirs", "kw"),
    [(fo.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": True}),
     (fo.AdamW, torch.optim.AdamW, {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.05})],
)  # fmt: skip
def test_channels_last_and_transposed_parameters_bit_identical_to_torch(ours, theirs, kw) -> None:
    m1 = _cnn(int(torch.randint(1000, ())))
    assert not m1[0].weight.is_contiguous() and m1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not m1[4].weight.is_contiguous()
    m2 = copy.deepcopy(m1)
    o1, o2 = ours(m1.parameters(), backend="reference", **kw), theirs(m2.parameters(), foreach=False, **kw)
    for _ in range(8):
        x = torch.randn(4, 3, 6, 6).to(memory_format=torch.channels_last)
        y = torch.randint(0, 3, (4,))
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n
        assert p.stride() == q.stride(), n  # the layout is kept


def test_mask_on_channels_last_gates_logical_elements() -> None:
    w = torch.nn.Parameter(torch.randn(4, 3, 2, 5).to(memory_format=torch.channels_last))
    before = w.detach().clone()
    keep = torch.rand(w.shape) < 0.5
    opt = fo.SGD([w], lr=0.1, backend="reference")
    opt.set_mask(SaliencyMask.from_bool([keep]), mode="update")
    w.grad = torch.randn(w.shape).to(memory_format=torch.channels_last)
    g = w.grad.clone()
    opt.step()
    assert torch.equal(w.detach()[~keep], before[~keep])
    torch.testing.assert_close(w.detach()[keep], (before - 0.1 * g)[keep])
    assert not torch.equal(w.detach()[keep], before[keep])


def test_overlapping_parameter_refused_before_anything_moves() -> None:
    base = torch.randn(3, 1)
    w = torch.nn.Parameter(base.expand(3, 4))
    opt = fo.SGD([w], lr=0.1, backend="reference")
    w.grad = torch.ones(3, 4)
    with pytest.raises(ValueError, match="parameter 0"):
        opt.step()
    assert torch.equal(w.detach()[:, 0], base[:, 0])
