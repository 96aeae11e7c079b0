"""The reference's torch._foreach_* fast path (all-fp32 lists) equals its per-tensor loop bit for bit.

Mixed-dtype lists take the loop, so without this the two formulations could drift apart.
"""

from __future__ import annotations

import pytest
import torch

from fastclu.ops.reference import fisher, hvp, lerp, merge

SHAPES = [(), (1,), (0,), (7,), (3, 5), (4, 0), (2, 3, 4), (65,)]


def _rand(fn=torch.randn):
    return [fn(s) for s in SHAPES]


def _clone(xs):
    return [x.clone() for x in xs]


def _equal(xs, ys):
    return all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(xs, ys))


def _scalar(value: float, as_tensor: bool):
    return torch.tensor(value) if as_tensor else value


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("power", [1, 2])
def test_fisher_paths_agree(as_tensor, power):
    f, g = _rand(torch.rand), _rand()
    f2 = _clone(f)
    s = _scalar(0.7, as_tensor)
    fisher._loop(f, g, s, power)
    fisher._foreach(f2, g, s, power)
    assert _equal(f, f2)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_lerp_paths_agree(as_tensor):
    slow, fast = _rand(), _rand()
    slow2, fast2 = _clone(slow), _clone(fast)
    lerp._loop(slow, fast, _scalar(0.3, as_tensor))
    lerp._foreach(slow2, fast2, _scalar(0.3, as_tensor))
    assert _equal(slow, slow2) and _equal(fast, fast2)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_merge_paths_agree(as_tensor):
    p, a = _rand(), _rand()
    p2 = _clone(p)
    merge._merge_loop(p, a, _scalar(0.45, as_tensor))
    merge._merge_foreach(p2, a, _scalar(0.45, as_tensor))
    assert _equal(p, p2)


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_hvp_paths_agree(as_tensor, accumulate):
    gp, gm, out = _rand(), _rand(), _rand()
    out2 = _clone(out)
    hvp._loop(out, gp, gm, _scalar(0.013, as_tensor), accumulate)
    hvp._foreach(out2, gp, gm, _scalar(0.013, as_tensor), accumulate)
    assert _equal(out, out2)
