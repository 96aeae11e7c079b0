"""End-to-end benchmark steps: the fastclu and torch sides make the same step."""

from __future__ import annotations

import torch

from fastclu import bench


def _twin_params(shapes: list[tuple[int, ...]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    a = bench._leaf_params(shapes, torch.float32, torch.device("cpu"))
    b = [p.detach().clone().requires_grad_(True) for p in a]
    for p, q in zip(a, b):
        p.grad.mul_(100.0)  # large enough that the clip at 7 is active
        q.grad = p.grad.clone()
    return a, b


def test_e2e_sfr_on_sides_make_the_same_step() -> None:
    shapes = bench.resnet18_shapes(10, 4, stem="cifar")
    mine, theirs = _twin_params(shapes)
    masks = [torch.rand(s) < 0.5 for s in shapes]
    total = torch.cat([(bench.SFR_ALPHA * g * m).reshape(-1) for g, m in zip([p.grad for p in mine], masks)]).norm()
    assert total > bench.SFR_CLIP  # the clip path is exercised
    bench.sfr_on_fastclu_step(mine, masks, "reference")()
    bench.sfr_on_torch_step(theirs, masks)()
    for p, q in zip(mine, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_e2e_pm_sides_make_the_same_step() -> None:
    shapes = bench.gpt2_shapes(vocab=50, ctx=8, dim=16, depth=1)
    mine, theirs = _twin_params(shapes)
    start = [p.detach().clone() for p in mine]
    f_step, t_step = bench.pm_fastclu_step(mine, "reference"), bench.pm_torch_step(theirs)
    for _ in range(2):
        f_step()
        t_step()
    for p, q, s in zip(mine, theirs, start):
        assert not torch.equal(p.detach(), s)
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
