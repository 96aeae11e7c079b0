"""fastclu.ops.library: every op as a ``fastclu::`` custom op, and the routing of the public ops
through them while ``torch.compile`` traces (so a compiled step does not graph-break)."""

from __future__ import annotations

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastclu.ops as O
from fastclu.ops import library as L

SIZES = [(5, 3), (1,), (17,)]


def test_fake_implementations_give_output_shapes() -> None:
    assert all(hasattr(torch.ops.fastclu, op) for op in L.__all__)
    with FakeTensorMode():
        p = [torch.empty(s) for s in SIZES]
        g = [torch.empty(s) for s in SIZES]
        masks = L.ratio_mask(p, g, 1.0)
        assert [tuple(m.shape) for m in masks] == [(2,), (1,), (3,)] and all(m.dtype == torch.uint8 for m in masks)
        assert [tuple(m.shape) for m in L.topk_mask(p, 4)] == [(2,), (1,), (3,)]
        gm = L.gram([p, g, g], mask=masks, masked=[True, False, True])
        assert tuple(gm.shape) == (3, 3) and gm.dtype == torch.float32
        num, den = L.merge_stats(p, g, g, g)
        assert num.shape == () and den.shape == ()


def _kernel_backend() -> str:
    # Without a GPU the Triton kernels run under the interpreter (tests/conftest.py sets it).
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    pytest.skip("no kernel backend can run here")


@pytest.mark.interpreter
@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_public_ops_compile_without_graph_break(rule: str) -> None:
    """The public ops, called with a kernel backend inside a fullgraph compile, equal eager."""
    backend = _kernel_backend()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    params = [torch.randn(s, device=dev) for s in SIZES]
    g_forget = [torch.randn(s, device=dev) for s in SIZES]
    g_remain = [torch.randn(s, device=dev) for s in SIZES]
    if rule == "sgd":
        state = {"momentum_buffer": [torch.randn(s, device=dev) for s in SIZES]}
        kw = {"momentum": 0.9, "weight_decay": 1e-2}
    else:
        state = {
            "exp_avg": [torch.randn(s, device=dev) for s in SIZES],
            "exp_avg_sq": [torch.rand(s, device=dev) for s in SIZES],
            "step": [torch.tensor(3.0) for _ in SIZES],
        }
        kw = {"weight_decay": 1e-2}

    def step(p, st, lr, c):
        mask = O.topk_mask(g_forget, 9, backend=backend)
        G = O.gram([g_forget, g_remain], mask=mask, masked=[True, False], backend=backend)
        clip = torch.clamp(2.0 / (G[0, 0].sqrt() + 1e-6), max=1.0)
        O.combine_step_(p, [g_forget, g_remain], st, rule=rule, lr=lr, coeffs=[c, 1.0], scale=clip, mask=mask,
                        masked=[True, False], backend=backend, **kw)  # fmt: skip
        return G

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    lr, c = torch.tensor(0.05, device=dev), torch.tensor(-2.0, device=dev)
    p1, s1 = [x.clone() for x in params], {k: [x.clone() for x in v] for k, v in state.items()}
    p2, s2 = [x.clone() for x in params], {k: [x.clone() for x in v] for k, v in state.items()}
    G1 = compiled(p1, s1, lr, c)
    G2 = step(p2, s2, lr, c)
    assert torch.equal(G1, G2)
    for a, b in zip(p1 + [x for v in s1.values() for x in v], p2 + [x for v in s2.values() for x in v]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(p1, params))
