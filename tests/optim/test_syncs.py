"""0 host syncs per optimizer step after warm-up: plain, masked clipped 2-role, AMP (GradScaler).

On the CPU a sync cannot be observed directly, so the calls that would be one on a GPU are
counted while the steps run: ``Tensor.item / tolist / cpu / numpy``, ``float(t)`` / ``int(t)`` /
``bool(t)`` / ``operator.index(t)`` (what ``if t:`` and ``float(t)`` do) and, for the triton
backend, ``torch.tensor`` / ``torch.as_tensor`` (a host tensor built per step is what a
per-step upload starts from). Triton runs with its launches stubbed (the interpreter itself
reads tensors on the host); the cuda backend runs its kernels in the CPU execution mode
(:mod:`fastclu.ops._cuda_cpu_mode`, whose host-memory tables stand in for the pinned uploads, so
``torch.tensor`` is not counted there). On a GPU, ``torch.cuda.set_sync_debug_mode("error")``
turns any sync into an error.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import torch

from fastclu.bench.host import stubbed_launches
from fastclu.ops.bits import pack_bits
from fastclu.optim import SGD, AdamW, FastSlow

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
HOST_TENSORS = ("tensor", "as_tensor")
CASES = ("adamw", "sgd_momentum", "masked_clipped_2role", "amp", "amp_sgd", "fastslow", "tensor_lr_scheduler")


@contextlib.contextmanager
def counting_syncs(count_host_tensors: bool) -> Iterator[Counter]:
    counts: Counter = Counter()
    saved = []

    def wrap(owner: object, name: str) -> None:
        orig = getattr(owner, name)

        def counted(*args: object, **kwargs: object) -> object:
            counts[name] += 1
            return orig(*args, **kwargs)

        saved.append((owner, name, orig))
        setattr(owner, name, counted)

    for name in SYNC_METHODS:
        wrap(torch.Tensor, name)
    if count_host_tensors:
        for name in HOST_TENSORS:
            wrap(torch, name)
    try:
        yield counts
    finally:
        for owner, name, orig in reversed(saved):
            setattr(owner, name, orig)


def _params(device: torch.device, n: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    shapes = [(5, 3), (7,), (1,), (4, 2, 3), (0,), (9,), ()][:n]
    ps = [torch.randn(s, generator=g).to(device).requires_grad_(True) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    return ps


def _make_step(case: str, device: torch.device, backend: str) -> Callable[[], None]:
    """A step of ``case`` that a training loop would run (grads refilled, stash, step, scaler)."""
    params = _params(device)
    # The same gradient tensors every step (as fastclu bench --host does): the triton backend's
    # tables are still keyed on gradient addresses, and fresh ones rebuild (and upload) them.
    grads = [p.grad for p in params]
    forget = [(g * 0.5).contiguous() for g in grads]

    def refill() -> None:
        for p, g in zip(params, grads):
            p.grad = g

    if case in ("adamw", "sgd_momentum", "fastslow", "tensor_lr_scheduler"):
        if case == "sgd_momentum":
            opt = SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, backend=backend)
        elif case == "tensor_lr_scheduler":
            opt = AdamW(params, lr=torch.tensor(1e-3, device=device), backend=backend)
        else:
            opt = AdamW(params, lr=1e-3, backend=backend)
        stepper = FastSlow(opt, k=2, beta=0.5, backend=backend) if case == "fastslow" else opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9) if case == "tensor_lr_scheduler" else None

        def step() -> None:
            refill()
            stepper.step()
            if sched is not None:
                sched.step()

        return step
    opt = (SGD(params, lr=0.01, momentum=0.9, backend=backend) if case == "amp_sgd"
           else AdamW(params, lr=1e-3, backend=backend))  # fmt: skip
    bits = [torch.rand(p.shape, generator=torch.Generator().manual_seed(3)) > 0.3 for p in params]
    opt.set_mask([pack_bits(b.to(device)) for b in bits], mode="grad", roles=["forget"])
    scaler = None
    if case.startswith("amp"):
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**4)
        scaler.scale(torch.ones((), device=device))
    combine = {"forget": -1.0, "grad": 1.0}

    def step() -> None:
        for p, g in zip(params, forget):
            p.grad = g
        opt.stash("forget")
        refill()
        if scaler is None:
            opt.step(combine=combine, clip=1.0)
        else:
            scaler.step(opt, combine=combine, clip=1.0)
            scaler.update()

    return step


def _syncs_after_warmup(case: str, backend: str, count_host_tensors: bool) -> Counter:
    step = _make_step(case, torch.device("cpu"), backend)
    for _ in range(3):  # warm-up: state, layouts, group checks
        step()
    with counting_syncs(count_host_tensors) as counts:
        for _ in range(4):
            step()
    return counts


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES)
def test_no_host_sync_per_step_triton(case: str) -> None:
    with stubbed_launches() as launches:
        counts = _syncs_after_warmup(case, "triton", count_host_tensors=True)
    assert launches.count > 0, "the triton backend did not run"
    assert dict(counts) == {}


@pytest.fixture
def cuda_cpu_mode() -> Iterator[None]:
    from fastclu.ops import _cuda_cpu_mode

    reason = _cuda_cpu_mode.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    undo = _cuda_cpu_mode.enable()
    try:
        yield
    finally:
        undo()


@pytest.mark.parametrize("case", CASES)
def test_no_host_sync_per_step_cuda_cpu_mode(case: str, cuda_cpu_mode: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastclu import _registry

    calls = Counter()
    impl = _registry.implementation("combine_step_", "cuda")

    def counted(*args: object, **kwargs: object) -> None:
        calls["combine_step_"] += 1
        return impl(*args, **kwargs)

    monkeypatch.setitem(_registry._impls["combine_step_"], "cuda", counted)
    counts = _syncs_after_warmup(case, "cuda", count_host_tensors=False)
    assert calls["combine_step_"] > 0, "the cuda backend did not run"
    assert dict(counts) == {}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", CASES)
def test_no_host_sync_per_step_gpu(case: str, backend: str) -> None:
    import fastclu

    reason = fastclu.backends()[backend]
    if reason is not None:
        pytest.skip(reason)
    step = _make_step(case, torch.device("cuda"), backend)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
