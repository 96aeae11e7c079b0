"""Parity with torch.optim.SGD / AdamW (single-tensor path) on a small network for 50 steps.

Reference backend: bit-identical over every argument combination (its formulation without
torch's fused kernel, ``FASTCLU_REFERENCE_FUSED=0``; with it, AdamW is bit-identical to torch's
``fused=True`` step instead). Kernel backends (GPU only): within rtol 1e-4 / atol 1e-5 of torch
after 50 steps (fp32 kernels reassociate a few ops).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import fastclu.optim as fo

STEPS = 50


def _net(dtype=torch.float32, device="cpu"):
    return torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 10, bias=False), torch.nn.ReLU(),
        torch.nn.Linear(10, 3),
    ).to(device, dtype)  # fmt: skip


def _groups(model, split):
    ps = list(model.parameters())
    if not split:
        return ps
    # two param groups with their own lr / weight decay
    return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02, "weight_decay": 0.003}]


@pytest.fixture(autouse=True)
def _unfused(monkeypatch):
    # The claims below are about the reference's formulation without torch's fused kernel.
    monkeypatch.setenv("FASTCLU_REFERENCE_FUSED", "0")


def _run(cls_ours, cls_torch, kw, *, split=False, dtype=torch.float32, device="cpu", backend="reference",
         torch_kw=None):  # fmt: skip
    m1 = _net(dtype, device)
    m2 = copy.deepcopy(m1)
    o1 = cls_ours(_groups(m1, split), backend=backend, **kw)
    o2 = cls_torch(_groups(m2, split), **(torch_kw or {"foreach": False}), **kw)
    data = [(torch.randn(8, 6, dtype=dtype, device=device), torch.randint(0, 3, (8,), device=device))
            for _ in range(STEPS)]  # fmt: skip
    for x, y in data:
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    return m1, m2, o1, o2


def _sgd_cases():
    variants = [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.5, False), (0.9, 0.0, True)]
    for (mom, damp, nest), wd, maxi, tlr in itertools.product(variants, [0.0, 1e-3], [False, True], [False, True]):
        yield {"lr": torch.tensor(0.05) if tlr else 0.05, "momentum": mom, "dampening": damp, "nesterov": nest,
                   "weight_decay": wd, "maximize": maxi}  # fmt: skip


def _adamw_cases():
    for ams, wd, maxi, tlr in itertools.product([False, True], [0.0, 0.05], [False, True], [False, True]):
        yield {"lr": torch.tensor(3e-3) if tlr else 3e-3, "betas": (0.8, 0.95), "eps": 1e-7, "amsgrad": ams,
                   "weight_decay": wd, "maximize": maxi}  # fmt: skip


def _ids(cases):
    return ["-".join(f"{k}={'T' if isinstance(v, torch.Tensor) else v}" for k, v in c.items()) for c in cases]


SGD_CASES = list(_sgd_cases())
ADAMW_CASES = list(_adamw_cases())


def _assert_identical(m1, m2, o1, o2):
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        assert s1[k].keys() == s2[k].keys()
        for key in s1[k]:
            assert torch.equal(s1[k][key].cpu(), s2[k][key].cpu()), key


@pytest.mark.parametrize("kw", SGD_CASES, ids=_ids(SGD_CASES))
def test_sgd_bit_identical(kw):
    _assert_identical(*_run(fo.SGD, torch.optim.SGD, kw))


@pytest.mark.parametrize("kw", ADAMW_CASES, ids=_ids(ADAMW_CASES))
def test_adamw_bit_identical(kw):
    _assert_identical(*_run(fo.AdamW, torch.optim.AdamW, kw))


@pytest.mark.parametrize("kw", ADAMW_CASES, ids=_ids(ADAMW_CASES))
@pytest.mark.parametrize("split", [False, True])
def test_adamw_fused_bit_identical_to_torch_fused(kw, split, monkeypatch):
    # With torch's fused kernel on (the default), the reference's fp32 AdamW step is torch's
    # fused=True step, bit for bit.
    monkeypatch.setenv("FASTCLU_REFERENCE_FUSED", "1")
    _assert_identical(*_run(fo.AdamW, torch.optim.AdamW, kw, split=split, torch_kw={"fused": True}))


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_param_groups_and_dtypes_bit_identical(name, dtype):
    kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3} if name == "SGD" else {"lr": 3e-3, "weight_decay": 0.01}
    m1, m2, o1, o2 = _run(getattr(fo, name), getattr(torch.optim, name), kw, split=True, dtype=dtype)
    _assert_identical(m1, m2, o1, o2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [None, "triton", "cuda"])
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_kernels_match_torch_within_tolerance(name, backend):
    from fastclu import backends

    if backend is not None and backends()[backend] is not None:
        pytest.skip(f"backend {backend} unavailable: {backends()[backend]}")
    kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": True} if name == "SGD" else {"lr": 3e-3}
    m1, m2, _, _ = _run(getattr(fo, name), getattr(torch.optim, name), kw, split=True, device="cuda", backend=backend)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add contention on a shared CI machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_triton_backend_matches_reference_with_roles_mask_clip_penalty(name):
    """The optimizer on the Triton kernels (interpreter on CPU, or a GPU) vs the reference backend:
    rtol 1e-5 / atol 1e-6 after 12 steps with stashed roles, a grad-mode mask, clipping and the penalty."""
    from fastclu import backends
    from fastclu.saliency import SaliencyMask

    if backends()["triton"] is not None:
        pytest.skip(f"triton backend unavailable: {backends()['triton']}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3} if name == "SGD" else {"lr": 3e-3, "amsgrad": True}
    m_ref = _net(device=device)
    m_tri = copy.deepcopy(m_ref)
    mask = SaliencyMask.from_bool([torch.rand(p.shape) < 0.5 for p in m_ref.parameters()]).to(device)
    importance = [torch.rand(p.shape, device=device) for p in m_ref.parameters()]
    anchor = [p.detach().clone() for p in m_ref.parameters()]
    opts = []
    for m, backend in ((m_ref, "reference"), (m_tri, "triton")):
        o = getattr(fo, name)(m.parameters(), backend=backend, **kw)
        o.set_mask(mask, mode="grad", roles=["forget"])
        o.set_anchor(importance=importance, lam=0.1, anchor=anchor)
        opts.append(o)
    for step in range(12):
        xf, yf = torch.randn(8, 6, device=device), torch.randint(0, 3, (8,), device=device)
        xr, yr = torch.randn(8, 6, device=device), torch.randint(0, 3, (8,), device=device)
        for m, o in zip((m_ref, m_tri), opts):
            o.zero_grad()
            if step % 3 == 0:
                torch.nn.functional.cross_entropy(m(xf), yf).backward()
                o.stash("forget")
            torch.nn.functional.cross_entropy(m(xr), yr).backward()
            o.step(combine={"forget": -0.5, "grad": 1.0}, clip=0.3) if step % 3 == 0 else o.step()
    for a, b in zip(m_ref.parameters(), m_tri.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
