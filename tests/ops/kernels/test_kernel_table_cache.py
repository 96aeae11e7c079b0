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


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_steps_do_not_reread_stable_operands(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The optimizer's buckets hold their tables (_table.stable_operands): after warm-up a step
    # reads only the per-step operands' addresses (the live grads and the stashed role: two
    # lists per combine call, two per gram call), never the params' or the state's.
    model, (x, y) = _model(), _data()
    opt = AdamW(model.parameters(), lr=1e-2, backend=backend)
    opt.set_mask([torch.full(((p.numel() + 7) // 8,), 0xB5, dtype=torch.uint8, device=DEVICE)
                  for p in model.parameters()], mode="grad", roles=["forget"])  # fmt: skip

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _loss(model, x, (y + 1) % 3).backward()
        opt.stash("forget")
        _loss(model, x, y).backward()
        opt.step(combine={"forget": -1.0, "grad": 1.0}, clip=0.5)

    step()
    step()
    reads: list[int] = []
    real = _table._ptrs_of
    monkeypatch.setattr(_table, "_ptrs_of", lambda xs: reads.append(len(xs)) or real(xs))
    _table.reset_stats()
    step()
    assert _table.stats()["builds"] == 0
    assert len(reads) == 4, reads  # gram: 2 roles; combine: 2 roles — nothing stable


@pytest.mark.parametrize("backend", BACKENDS)
def test_swapped_storage_gets_fresh_tables(backend: str) -> None:
    # p.data = ... gives the parameter a new address: the layout (and its tables) must be rebuilt,
    # or the kernel would write the old storage. Checked against the reference backend.
    torch.manual_seed(0)
    model, (x, y) = _model(), _data()
    twin = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(DEVICE)
    twin.load_state_dict(model.state_dict())
    opts = [AdamW(model.parameters(), lr=1e-2, backend=backend), AdamW(twin.parameters(), lr=1e-2, backend="reference")]
    for k in range(4):
        for m, opt in zip((model, twin), opts):
            if k == 2:
                w = m[0].weight
                w.data = w.data.clone() + 0.25  # new storage, new values
            opt.zero_grad(set_to_none=True)
            _loss(m, x, y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
