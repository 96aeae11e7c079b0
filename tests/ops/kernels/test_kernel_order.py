"""No kernel may depend on the order in which the programs of one launch run.

The interpreter runs a launch's programs one after another in ascending order; a GPU runs them
in any order, concurrently. Here every multi-tensor launch is replaced by one single-program
launch per block, in a fresh random order: a kernel that reads what an earlier program of the
same launch wrote (a prefix sum, tie counts, a shared byte) would then disagree with the
reference. Sequential execution cannot show races between concurrent programs, only order
dependence; the bytes each program owns are checked separately in the mask tests.
"""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import DEVICE, TRITON, assert_close, assert_equal, clone, rand, randn, random_masks

import fastclu.ops as O

pytestmark = TRITON

from fastclu._registry import FAMILIES

MODULES = FAMILIES


@pytest.fixture
def shuffled(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastclu

    assert fastclu.backends()["triton"] is None
    import importlib

    from fastclu.ops.triton import _multitensor as mt

    def launch(kernel, g, *args, **meta) -> None:
        for blk0, n, even in mt.launches(g):
            for b in torch.randperm(n).tolist():
                kernel[(1,)](*args, blk0 + b, EVEN=even, ALIGN=g.align, LAYOUT=mt.layout(g), **meta)

    for name in MODULES:
        mod = importlib.import_module(f"fastclu.ops.triton.{name}")
        monkeypatch.setattr(mod, "launch", launch)


def _sizes() -> list[int]:
    from fastclu.ops.triton._multitensor import BLOCK

    # several blocks per tensor, partial tails, an empty tensor, tensors of one element
    return [3 * BLOCK + 5, 1, 0, BLOCK, 2 * BLOCK - 3, 7]


def test_topk_ties_order_independent(shuffled) -> None:
    sizes = _sizes()
    # few distinct values: the tie-break (earliest in global flat order) decides most bits
    scores = [(torch.randint(-2, 3, (n,), device=DEVICE) * 0.5).float() for n in sizes]
    total = sum(sizes)
    for k in (1, int(torch.randint(2, total - 1, ())), total - 1):
        assert_equal(O.topk_mask(scores, k, backend="triton"), O.topk_mask(scores, k, backend="reference"))


def test_masks_and_reductions_order_independent(shuffled) -> None:
    sizes = _sizes()
    ff, fr = rand(sizes), rand(sizes)
    assert_equal(O.ratio_mask(ff, fr, 0.9, backend="triton"), O.ratio_mask(ff, fr, 0.9, backend="reference"))
    g = [randn(sizes), randn(sizes)]
    mask = random_masks(sizes)
    got = O.gram(g, mask=mask, masked=[True, False], backend="triton")
    want = O.gram(g, mask=mask, masked=[True, False], backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    p, a, fs, ft = randn(sizes), randn(sizes), rand(sizes), randn(sizes)
    got = torch.stack(O.merge_stats(p, a, fs, ft, backend="triton"))
    want = torch.stack(O.merge_stats(p, a, fs, ft, backend="reference")).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_elementwise_order_independent(shuffled) -> None:
    sizes = _sizes()
    params, grads = randn(sizes), [randn(sizes), randn(sizes)]
    state = {"exp_avg": randn(sizes, scale=0.1), "exp_avg_sq": rand(sizes, lo=0.01, hi=0.1),
             "step": [torch.tensor(3.0, device=DEVICE) for _ in sizes]}  # fmt: skip
    out = {}
    for b in ("triton", "reference"):
        p, s = clone(params), {k: clone(v) for k, v in state.items()}
        O.combine_step_(p, grads, s, rule="adamw", lr=1e-2, coeffs=[1.0, -0.5], mask=random_masks(sizes, 1.0),
                        mask_mode="update", weight_decay=0.01, backend=b)  # fmt: skip
        noisy = clone(p)
        norms = O.perturb_(noisy, 0.3, seed=12345, backend=b)
        out[b] = (p, s, noisy, norms)
    (p1, s1, n1, r1), (p2, s2, n2, r2) = out["triton"], out["reference"]
    assert_close(p1, p2, torch.float32)
    assert_close(s1["exp_avg"], s2["exp_avg"], torch.float32)
    assert_close(r1, r2, torch.float32)
    assert_close(n1, n2, torch.float32, scale=2.0)
