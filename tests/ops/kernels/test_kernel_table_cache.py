"""The shared tables are rebuilt only when the stable operands change (counts, not time).

100 real fastclu.optim.AdamW steps on a small model: gradients freed every step
(``zero_grad(set_to_none=True)``) and a stashed role every step must not rebuild a stable
table; they only re-upload the small per-step pointer array. A changed parameter set must
rebuild. Both kernel backends (Triton under the interpreter, cuda on the CPU without a GPU).
"""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import BACKENDS, DEVICE

from fastclu.ops import _table
from fastclu.optim import AdamW

STEPS = 100


def _model() -> torch.nn.Module:
    # a few small tensors of odd sizes (tails), so 100 interpreted steps stay cheap
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(DEVICE)


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x), y)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(16, 5, device=DEVICE), torch.randint(0, 3, (16,), device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_to_none_steps_never_rebuild(backend: str) -> None:
    model, (x, y) = _model(), _data()
    opt = AdamW(model.parameters(), lr=1e-2, backend=backend)
    before = [p.detach().clone() for p in model.parameters()]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        opt.step()

    step()  # warm-up: builds the tables once
    _table.reset_stats()
    for _ in range(STEPS):
        step()
    got = _table.stats()
    assert got["builds"] == 0, got
    assert got["hits"] >= STEPS, got  # every step used the cached table
    assert got["pointer_uploads"] <= STEPS, got  # at most one small upload per step
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before)), "the steps did nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_stashed_role_steps_never_rebuild(backend: str) -> None:
    model, (x, y) = _model(), _data()
    opt = AdamW(model.parameters(), lr=1e-2, backend=backend)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _loss(model, x, (y + 1) % 3).backward()
        opt.stash("forget")
        _loss(model, x, y).backward()
        opt.step(combine={"forget": -1.0, "grad": 1.0})

    step()
    _table.reset_stats()
    for _ in range(STEPS):
        step()
    got = _table.stats()
    assert got["builds"] == 0, got
    assert got["hits"] >= STEPS and got["pointer_uploads"] <= STEPS, got


@pytest.mark.parametrize("backend", BACKENDS)
def test_changed_parameter_set_rebuilds(backend: str) -> None:
    model, (x, y) = _model(), _data()
    opt = AdamW(model.parameters(), lr=1e-2, backend=backend)
    _loss(model, x, y).backward()
    opt.step()
    _table.reset_stats()
    extra = torch.nn.Parameter(torch.randn(9, device=DEVICE))
    opt.add_param_group({"params": [extra]})
    opt.zero_grad(set_to_none=True)
    (_loss(model, x, y) + extra.square().sum()).backward()
    opt.step()
    assert _table.stats()["builds"] >= 1
