"""``torch.compile`` of fastclu steps: no recompiles after warm-up, numbers as in eager mode.

Recompiles are counted with ``torch._dynamo.testing.CompileCounter`` (frames compiled; a
recompile is one more frame for the same code). What runs on the CPU: the reference backend
(plain PyTorch, traced; its AdamW rule reads the step counter with ``.item()``, a graph break,
so it is compiled in pieces) and the triton backend under the interpreter, reached through its
``fastclu::`` custom ops (opaque graph nodes), which also compiles with ``fullgraph=True``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from fastclu.optim import AdamW

WARMUP, STEPS = 4, 20


def _model() -> torch.nn.Module:
    torch.manual_seed(11)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(6, 5, generator=g) for _ in range(n)]


def _iteration(m: torch.nn.Module, opt: AdamW, step, x: torch.Tensor, i: int) -> None:
    """A plain step, and every third one a stashed 'forget' role combined and clipped."""
    if i % 3 == 0:
        m(x).pow(2).mean().backward()
        opt.stash("forget")
        m(x).sum().backward()
        step(combine={"forget": -0.5, "grad": 1.0}, clip=0.5)
    else:
        m(x).pow(2).mean().backward()
        step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiled_step_does_not_recompile(backend: str) -> None:
    torch._dynamo.reset()
    m, twin = _model(), _model()
    opt = AdamW(m.parameters(), lr=torch.tensor(0.01), weight_decay=0.1, backend=backend)
    eager = AdamW(twin.parameters(), lr=torch.tensor(0.01), weight_decay=0.1, backend=backend)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    sched_eager = torch.optim.lr_scheduler.ExponentialLR(eager, gamma=0.9)
    cnt = CompileCounter()
    step = torch.compile(opt.step, backend=cnt)
    xs = _batches(WARMUP + STEPS)
    for i, x in enumerate(xs):
        if i == WARMUP:
            frames = cnt.frame_count
        _iteration(m, opt, step, x, i)
        _iteration(twin, eager, eager.step, x, i)
        sched.step()
        sched_eager.step()
    assert cnt.frame_count > 0, "nothing was compiled"
    assert cnt.frame_count - frames == 0, f"{cnt.frame_count - frames} recompiles after warm-up"
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    torch.testing.assert_close(opt.param_groups[0]["lr"], torch.tensor(0.01 * 0.9 ** len(xs)))
    for a, b in zip(m.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
def test_fullgraph_step_with_a_tensor_lr() -> None:
    # No graph break anywhere in the step: hyper-parameters held in tensors are checked where
    # they are set, never branched on per step; the kernels are custom ops.
    torch._dynamo.reset()
    m, twin = _model(), _model()
    opt = AdamW(m.parameters(), lr=torch.tensor(0.02), backend="triton")
    eager = AdamW(twin.parameters(), lr=torch.tensor(0.02), backend="triton")
    cnt = CompileCounter()

    @torch.compile(backend=cnt, fullgraph=True)
    def step(**kwargs):
        return opt.step(**kwargs)

    xs = _batches(WARMUP + 10)
    for i, x in enumerate(xs):
        if i == WARMUP:  # each step kind compiled once with its state in place
            frames = cnt.frame_count
        _iteration(m, opt, step, x, i)
        _iteration(twin, eager, eager.step, x, i)
        for o in (opt, eager):
            o.param_groups[0]["lr"].mul_(0.8)  # what an LR scheduler does to a tensor lr
    assert cnt.frame_count - frames == 0
    for a, b in zip(m.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_layouts_are_reused_and_rebuilt_on_changes() -> None:
    """The layout cache: one build for repeated steps; rebuilt on set_mask, add_param_group,
    load_state_dict and a swapped parameter storage; the numbers stay torch's."""
    m = _model()
    ref_model = copy.deepcopy(m)
    opt = AdamW(m.parameters(), lr=0.01, backend="reference")
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.01)
    builds = []
    build = opt._build_layout

    def counted(*args, **kwargs):
        builds.append(1)
        return build(*args, **kwargs)

    opt._build_layout = counted
    xs = _batches(6)
    for i, x in enumerate(xs):
        for model, o in ((m, opt), (ref_model, ref)):
            model(x).pow(2).mean().backward()
            o.step()
            o.zero_grad(set_to_none=True)
        if i == 2:
            assert len(builds) == 1
            opt.load_state_dict(opt.state_dict())
        if i == 3:
            assert len(builds) == 2
            with torch.no_grad():  # new storage, same parameter object (and ref the same values)
                for p, q in zip(m.parameters(), ref_model.parameters()):
                    p.data = p.data.clone()
                    assert torch.equal(p, q)
        if i == 4:
            assert len(builds) == 3
    for a, b in zip(m.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
