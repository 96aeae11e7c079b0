"""fastclu's SGD and AdamW step meta-device parameters (backend reference), as torch's do.

Every ``optim_inputs_func`` case of torch's ``optim_db`` (built for ``device="meta"``), with
``foreach`` None / False / True and both formulations of the reference: the step runs, and the
state it creates has the keys, shapes, dtypes and devices of torch's own meta step (the step
counter's device aside). Plus the
fastclu-only paths (mask, several roles, clip, update-mode mask).
"""

from __future__ import annotations

import pytest
import torch
from _optim_db import INFOS, OURS, TORCH


def _cases() -> list:
    out = []
    for name, info in INFOS.items():
        for i, case in enumerate(info.optim_inputs_func(device="meta", dtype=torch.float32)):
            for foreach in (None, False, True):
                out.append(pytest.param(name, case, foreach, id=f"{name}-{i}-{case.desc}-{foreach}"))
    return out


def _meta_params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.empty(s, device="meta")) for s in [(3, 2), (5,), ()]]


def _run(cls, kwargs: dict, foreach: bool | None, steps: int = 2, **extra) -> tuple[list, torch.optim.Optimizer]:
    params = _meta_params()
    opt = cls(params, **kwargs, foreach=foreach, **extra)
    for _ in range(steps):
        for p in params:
            p.grad = torch.empty_like(p)
        opt.step()
    return params, opt


def _layout(params, opt) -> list[dict]:
    # The step counter's device is left out: fastclu keeps it on the parameter's device (its
    # kernels read it there), torch's non-capturable path on the CPU.
    return [{k: (v.shape, v.dtype, "-" if k == "step" else v.device.type) for k, v in opt.state[p].items()
             if torch.is_tensor(v)} for p in params]  # fmt: skip


@pytest.mark.parametrize("path", ["0", "1"], ids=["single", "foreach"])
@pytest.mark.parametrize(("name", "case", "foreach"), _cases())
def test_optim_db_cases_step_on_meta(name, case, foreach, path, monkeypatch):
    monkeypatch.setenv("FASTCLU_REFERENCE_FOREACH", path)
    ours, o1 = _run(OURS[name], dict(case.kwargs), foreach, backend="reference")
    theirs, o2 = _run(TORCH[name], dict(case.kwargs), foreach)
    assert all(p.device.type == "meta" for p in ours)
    assert _layout(ours, o1) == _layout(theirs, o2)


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
@pytest.mark.parametrize("mode", ["grad", "update"])
@pytest.mark.parametrize("path", ["0", "1"], ids=["single", "foreach"])
def test_masked_clipped_two_role_step_on_meta(name, mode, path, monkeypatch):
    monkeypatch.setenv("FASTCLU_REFERENCE_FOREACH", path)
    params = _meta_params()
    kw = {"momentum": 0.9} if name == "SGD" else {"amsgrad": True}
    opt = OURS[name](params, lr=torch.tensor(0.1, device="meta"), backend="reference", **kw)
    masks = [torch.empty((p.numel() + 7) // 8, dtype=torch.uint8, device="meta") for p in params]
    opt.set_mask(masks, mode=mode, roles=["forget"] if mode == "grad" else None)
    for _ in range(2):
        for p in params:
            p.grad = torch.empty_like(p)
        opt.stash("forget")
        for p in params:
            p.grad = torch.empty_like(p)
        opt.step(combine={"forget": -1.0, "grad": 1.0}, clip=1.0)
    key = "momentum_buffer" if name == "SGD" else "exp_avg"
    assert all(opt.state[p][key].device.type == "meta" and opt.state[p][key].shape == p.shape for p in params)
