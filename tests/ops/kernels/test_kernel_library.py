"""fastclu.ops.library: the ops as torch.library custom ops (fake kernels, torch.compile)."""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import DEVICE, assert_close, clone, rand, randn

import fastclu.ops as O
from fastclu.ops import library as L

SIZES = [7, 33, 1]


def test_library_ops_equal_the_plain_ops() -> None:
    f, g, a = rand(SIZES), randn(SIZES), randn(SIZES)
    f1, f2 = clone(f), clone(f)
    L.fisher_accumulate_(f1, g, torch.tensor(0.5, device=DEVICE))
    O.fisher_accumulate_(f2, g, torch.tensor(0.5, device=DEVICE))
    assert_close(f1, f2, torch.float32)
    for x, y in zip(L.ratio_mask(f, a, 0.9), O.ratio_mask(f, a, 0.9)):
        assert torch.equal(x, y)
    for x, y in zip(L.topk_mask(g, 9), O.topk_mask(g, 9)):
        assert torch.equal(x, y)
    assert torch.equal(L.gram([g, a], mask=O.topk_mask(g, 9), masked=[True, False]),
                       O.gram([g, a], mask=O.topk_mask(g, 9), masked=[True, False]))  # fmt: skip
    n1, d1 = L.merge_stats(g, a, f, a)
    n2, d2 = O.merge_stats(g, a, f, a)
    assert torch.equal(n1, n2) and torch.equal(d1, d2)
    p1, p2 = clone(g), clone(g)
    b1 = [torch.full_like(x, float("nan")) for x in g]
    L.perturb_(p1, 0.3, anchor=a, backup=b1)
    O.perturb_(p2, 0.3, anchor=a)
    assert_close(p1, p2, torch.float32)
    L.restore_(p1, b1)
    assert all(torch.equal(x, y) for x, y in zip(p1, g))
    L.merge_(p1, a, 0.5)
    p2 = clone(g)
    O.merge_(p2, a, 0.5)
    assert_close(p1, p2, torch.float32)
    o1, o2 = clone(f), clone(f)
    L.fd_hvp_(o1, g, a, 0.1, accumulate=True)
    O.fd_hvp_(o2, g, a, 0.1, accumulate=True)
    assert_close(o1, o2, torch.float32)
    s1, s2, q1, q2 = clone(f), clone(f), clone(g), clone(g)
    L.lerp_sync_(s1, q1, 0.25)
    O.lerp_sync_(s2, q2, 0.25)
    assert_close(s1, s2, torch.float32)
    assert_close(q1, q2, torch.float32)


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_compiled_step_has_no_graph_break(rule: str) -> None:
    params, g_remain, g_forget = randn(SIZES), randn(SIZES), randn(SIZES)
    if rule == "sgd":
        state = {"momentum_buffer": randn(SIZES)}
        kw = {"momentum": 0.9, "weight_decay": 1e-2}
    else:
        state = {"exp_avg": randn(SIZES), "exp_avg_sq": rand(SIZES), "step": [torch.tensor(2.0) for _ in SIZES]}
        kw = {"weight_decay": 1e-2, "amsgrad": False}
    mask = O.topk_mask(g_forget, 10)

    def step(p, st, lr, c):
        G = L.gram([g_forget, g_remain], mask=mask, masked=[True, False])
        clip = torch.clamp(7.0 / (G[0, 0].sqrt() + 1e-12), max=1.0)
        L.combine_step_(p, [g_forget, g_remain], st, rule=rule, lr=lr, coeffs=[c, 1.0], scale=clip, mask=mask,
                        masked=[True, False], **kw)  # fmt: skip
        return G

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    lr, c = torch.tensor(0.05, device=DEVICE), torch.tensor(-2.0, device=DEVICE)
    p1, s1 = clone(params), {k: clone(v) for k, v in state.items()}
    p2, s2 = clone(params), {k: clone(v) for k, v in state.items()}
    G1 = compiled(p1, s1, lr, c)
    G2 = step(p2, s2, lr, c)
    assert torch.equal(G1, G2)
    assert_close(p1, p2, torch.float32)
    for k in state:
        assert_close(s1[k], s2[k], torch.float32)
    assert any(not torch.equal(x, y) for x, y in zip(p1, params))


def test_fake_kernels_give_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        xs = [torch.empty(13), torch.empty(4, 5)]
        masks = L.topk_mask(xs, 3)
        assert [m.shape for m in masks] == [(2,), (3,)] and masks[0].dtype == torch.uint8
        assert L.gram([xs, xs, xs]).shape == (3, 3)
        num, den = L.merge_stats(xs, xs, xs, xs)
        assert num.shape == () and den.dtype == torch.float32
