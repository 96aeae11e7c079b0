"""Bad inputs through the public ops: TypeError/ValueError naming the argument, nothing modified.

Validation runs before any backend, so these also cover ops whose reference is written elsewhere.
A second device is simulated with 'meta' tensors, which exist on CPU-only machines.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from fastclu import ops

SHAPES = [(3, 4), (5,)]


def P(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.randn(s).to(dtype) for s in SHAPES]


def meta_at(xs: list[torch.Tensor], i: int) -> list[torch.Tensor]:
    xs = list(xs)
    xs[i] = torch.empty(xs[i].shape, device="meta", dtype=xs[i].dtype)
    return xs


def int_at(xs: list[torch.Tensor], i: int) -> list[torch.Tensor]:
    xs = list(xs)
    xs[i] = torch.randint(-5, 5, xs[i].shape)
    return xs


def sparse_at(xs: list[torch.Tensor], i: int) -> list[torch.Tensor]:
    xs = list(xs)
    xs[i] = xs[i].to_sparse()
    return xs


def strided_at(xs: list[torch.Tensor], i: int) -> list[torch.Tensor]:
    # Same shape, non-contiguous: every other element of a buffer twice as long.
    xs = list(xs)
    buf = torch.randn(*xs[i].shape[:-1], xs[i].shape[-1] * 2)
    xs[i] = buf[..., ::2]
    assert not xs[i].is_contiguous()
    return xs


def shape_at(xs: list[torch.Tensor], i: int) -> list[torch.Tensor]:
    xs = list(xs)
    xs[i] = torch.randn(xs[i].numel() + 1)
    return xs


def _snapshot(objs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []

    def visit(o):
        if isinstance(o, torch.Tensor):
            if o.device.type != "meta":
                out.append((o, o.clone()))
        elif isinstance(o, (list, tuple)):
            for x in o:
                visit(x)
        elif isinstance(o, dict):
            for x in o.values():
                visit(x)

    visit(objs)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_sparse:
        a, b = a.to_dense(), b.to_dense()
    return torch.equal(a, b) or (
        a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    )


Case = tuple[str, Callable[[], tuple[Callable[[], object], object]], type, str]


def _fisher(grads=None, fisher=None, **kw):
    f = fisher if fisher is not None else [torch.rand(s) for s in SHAPES]
    g = grads if grads is not None else P()
    return lambda: ops.fisher_accumulate_(f, g, **kw), (f, g)


def _perturb(params=None, **kw):
    p = params if params is not None else P()
    kw.setdefault("backup", [torch.full_like(x, float("nan")) for x in p])
    return lambda: ops.perturb_(p, 0.5, **kw), (p, kw)


def _combine(grads=None, state=None, **kw):
    p = P()
    g = grads if grads is not None else [P()]
    st = state if state is not None else {"momentum_buffer": P()}
    kw.setdefault("lr", 0.1)
    return lambda: ops.combine_step_(p, g, st, **kw), (p, g, st)


def _gram(grads, **kw):
    return lambda: ops.gram(grads, **kw), grads


def _mask():
    return [ops.pack_bits(torch.rand(s) < 0.5) for s in SHAPES]


CASES: list[Case] = [
    # fisher_accumulate_
    ("fisher_len", lambda: _fisher(grads=P()[:1]), ValueError, "grads"),
    ("fisher_shape", lambda: _fisher(grads=shape_at(P(), 1)), ValueError, "grads[1]"),
    ("fisher_int_grads", lambda: _fisher(grads=int_at(P(), 0)), TypeError, "grads[0]"),
    ("fisher_int_state", lambda: _fisher(fisher=int_at(P(), 1)), TypeError, "fisher[1]"),
    ("fisher_meta_grads", lambda: _fisher(grads=meta_at(P(), 0)), ValueError, "grads[0]"),
    ("fisher_mixed_devices", lambda: _fisher(fisher=meta_at(P(), 1), grads=meta_at(P(), 1)), ValueError, "fisher"),
    ("fisher_sparse", lambda: _fisher(grads=sparse_at(P(), 0)), TypeError, "grads[0]"),
    ("fisher_noncontig", lambda: _fisher(grads=strided_at(P(), 0)), ValueError, "grads[0]"),
    ("fisher_power", lambda: _fisher(power=3), ValueError, "power"),
    ("fisher_scale_type", lambda: _fisher(scale="1"), TypeError, "scale"),
    ("fisher_scale_shape", lambda: _fisher(scale=torch.ones(2)), ValueError, "scale"),
    ("fisher_scale_device", lambda: _fisher(scale=torch.ones((), device="meta")), ValueError, "scale"),
    ("fisher_not_list", lambda: _fisher(fisher=torch.zeros(3)), TypeError, "fisher"),
    # ratio_mask / topk_mask
    (
        "ratio_shape",
        lambda: ((a := P(), b := shape_at(P(), 0)) and (lambda: ops.ratio_mask(a, b)), (a, b)),
        ValueError,
        "f_remain[0]",
    ),
    (
        "ratio_gamma",
        lambda: ((a := P(), b := P()) and (lambda: ops.ratio_mask(a, b, gamma=None)), (a, b)),
        TypeError,
        "gamma",
    ),
    ("topk_k_neg", lambda: ((s := P()) and (lambda: ops.topk_mask(s, -1)), s), ValueError, "k"),
    ("topk_k_big", lambda: ((s := P()) and (lambda: ops.topk_mask(s, 18)), s), ValueError, "k"),
    ("topk_k_float", lambda: ((s := P()) and (lambda: ops.topk_mask(s, 1.0)), s), TypeError, "k"),
    ("topk_k_bool", lambda: ((s := P()) and (lambda: ops.topk_mask(s, True)), s), TypeError, "k"),
    ("topk_int", lambda: ((s := int_at(P(), 0)) and (lambda: ops.topk_mask(s, 1)), s), TypeError, "scores[0]"),
    ("topk_devices", lambda: ((s := meta_at(P(), 1)) and (lambda: ops.topk_mask(s, 1)), s), ValueError, "scores"),
    ("topk_sparse", lambda: ((s := sparse_at(P(), 1)) and (lambda: ops.topk_mask(s, 1)), s), TypeError, "scores[1]"),
    # gram
    ("gram_roles", lambda: _gram([P() for _ in range(5)]), ValueError, "grads"),
    ("gram_not_list", lambda: _gram(torch.zeros(3)), TypeError, "grads"),
    ("gram_role_shape", lambda: _gram([P(), shape_at(P(), 0)]), ValueError, "grads[1][0]"),
    ("gram_role_len", lambda: _gram([P(), P()[:1]]), ValueError, "grads[1]"),
    ("gram_role_device", lambda: _gram([P(), meta_at(P(), 1)]), ValueError, "grads[1][1]"),
    ("gram_mask_bytes", lambda: _gram([P()], mask=[torch.zeros(1, dtype=torch.uint8)] * 2), ValueError, "mask[0]"),
    ("gram_mask_dtype", lambda: _gram([P()], mask=[torch.zeros(2), torch.zeros(1)]), TypeError, "mask[0]"),
    ("gram_flags_no_mask", lambda: _gram([P(), P()], masked=[True, False]), ValueError, "mask"),
    ("gram_flags_len", lambda: _gram([P(), P()], mask=_mask(), masked=[True]), ValueError, "masked"),
    # lerp_sync_
    (
        "lerp_shape",
        lambda: ((s := P(), f := shape_at(P(), 1)) and (lambda: ops.lerp_sync_(s, f, 0.5)), (s, f)),
        ValueError,
        "fast[1]",
    ),
    (
        "lerp_int",
        lambda: ((s := int_at(P(), 0), f := P()) and (lambda: ops.lerp_sync_(s, f, 0.5)), (s, f)),
        TypeError,
        "slow[0]",
    ),
    ("lerp_beta", lambda: ((s := P(), f := P()) and (lambda: ops.lerp_sync_(s, f, "0.5")), (s, f)), TypeError, "beta"),
    (
        "lerp_noncontig",
        lambda: ((s := P(), f := strided_at(P(), 0)) and (lambda: ops.lerp_sync_(s, f, 0.5)), (s, f)),
        ValueError,
        "fast[0]",
    ),
    # perturb_ / restore_
    ("perturb_two_sources", lambda: _perturb(anchor=P(), seed=1), ValueError, "anchor"),
    ("perturb_no_source", lambda: _perturb(), ValueError, "anchor"),
    ("perturb_backup_dtype", lambda: _perturb(seed=1, backup=P(torch.bfloat16)), TypeError, "backup[0]"),
    ("perturb_backup_shape", lambda: _perturb(seed=1, backup=shape_at(P(), 1)), ValueError, "backup[1]"),
    ("perturb_seed_neg", lambda: _perturb(seed=-1), ValueError, "seed"),
    ("perturb_seed_float", lambda: _perturb(seed=1.5), ValueError, "seed"),
    ("perturb_seed_big", lambda: _perturb(seed=2**64), ValueError, "seed"),
    (
        "perturb_row_norms_size",
        lambda: _perturb(seed=1, row_norms=[torch.ones(3), torch.ones(2)]),
        ValueError,
        "row_norms[1]",
    ),
    (
        "perturb_row_norms_device",
        lambda: _perturb(seed=1, row_norms=[torch.ones(3, device="meta"), torch.ones(1)]),
        ValueError,
        "row_norms[0]",
    ),
    ("perturb_row_norms_len", lambda: _perturb(seed=1, row_norms=[torch.ones(3)]), ValueError, "row_norms"),
    (
        "perturb_row_norms_no_seed",
        lambda: _perturb(direction=P(), row_norms=[torch.ones(3), torch.ones(1)]),
        ValueError,
        "row_norms",
    ),
    ("perturb_dir_noncontig", lambda: _perturb(direction=strided_at(P(), 0)), ValueError, "direction[0]"),
    ("perturb_dir_device", lambda: _perturb(direction=meta_at(P(), 1)), ValueError, "direction[1]"),
    ("perturb_anchor_int", lambda: _perturb(anchor=int_at(P(), 1)), TypeError, "anchor[1]"),
    ("perturb_anchor_sparse", lambda: _perturb(anchor=sparse_at(P(), 0)), TypeError, "anchor[0]"),
    (
        "restore_dtype",
        lambda: ((p := P(), b := P(torch.float16)) and (lambda: ops.restore_(p, b)), (p, b)),
        TypeError,
        "backup[0]",
    ),
    ("restore_len", lambda: ((p := P(), b := P()[:1]) and (lambda: ops.restore_(p, b)), (p, b)), ValueError, "backup"),
    (
        "restore_device",
        lambda: ((p := P(), b := meta_at(P(), 0)) and (lambda: ops.restore_(p, b)), (p, b)),
        ValueError,
        "backup[0]",
    ),
    # fd_hvp_
    (
        "hvp_eps_zero",
        lambda: ((o := P(), a := P(), b := P()) and (lambda: ops.fd_hvp_(o, a, b, 0.0)), (o, a, b)),
        ValueError,
        "eps",
    ),
    (
        "hvp_shape",
        lambda: ((o := P(), a := P(), b := shape_at(P(), 0)) and (lambda: ops.fd_hvp_(o, a, b, 0.1)), (o, a, b)),
        ValueError,
        "grads_minus[0]",
    ),
    (
        "hvp_out_int",
        lambda: ((o := int_at(P(), 1), a := P(), b := P()) and (lambda: ops.fd_hvp_(o, a, b, 0.1)), (o, a, b)),
        TypeError,
        "out[1]",
    ),
    # merge_stats / merge_
    (
        "merge_stats_len",
        lambda: ((p := P(), a := P(), f := P()[:1], t := P()) and (lambda: ops.merge_stats(p, a, f, t)), (p, a, f, t)),
        ValueError,
        "fisher_sum",
    ),
    (
        "merge_stats_sparse",
        lambda: (
            (p := P(), a := P(), f := P(), t := sparse_at(P(), 0)) and (lambda: ops.merge_stats(p, a, f, t)),
            (p, a, f, t),
        ),
        TypeError,
        "fisher_theta_sum[0]",
    ),
    ("merge_alpha", lambda: ((p := P(), a := P()) and (lambda: ops.merge_(p, a, [0.5])), (p, a)), TypeError, "alpha"),
    (
        "merge_anchor_device",
        lambda: ((p := P(), a := meta_at(P(), 0)) and (lambda: ops.merge_(p, a, 0.5)), (p, a)),
        ValueError,
        "anchor[0]",
    ),
    # combine_step_ (validation only; the step itself is tested with the optimizers)
    ("combine_rule", lambda: _combine(rule="adam"), ValueError, "rule"),
    ("combine_update_no_mask", lambda: _combine(mask_mode="update"), ValueError, "mask_mode"),
    ("combine_state", lambda: _combine(state={}, momentum=0.9), ValueError, "momentum_buffer"),
    ("combine_coeffs", lambda: _combine(coeffs=[1.0, 2.0]), ValueError, "coeffs"),
    ("combine_nesterov", lambda: _combine(nesterov=True), ValueError, "nesterov"),
    ("combine_lr", lambda: _combine(lr="0.1"), TypeError, "lr"),
    ("combine_grad_int", lambda: _combine(grads=[int_at(P(), 0)]), TypeError, "grads[0][0]"),
    # restore_from is copied bit for bit: another dtype is refused, not cast
    ("combine_restore_dtype", lambda: _combine(restore_from=P(torch.float64)), TypeError, "restore_from[0]"),
    (
        "combine_restore_bf16",
        lambda: _combine(restore_from=P()[:1] + P(torch.bfloat16)[1:]),
        TypeError,
        "restore_from[1]",
    ),
    (
        "combine_restore_shape",
        lambda: _combine(restore_from=[P()[0].t().contiguous(), P()[1]]),
        ValueError,
        "restore_from[0]",
    ),
    # a packed mask is flat: the right byte count in another shape is refused
    ("combine_mask_2d", lambda: _combine(mask=[_mask()[0].reshape(1, 2), _mask()[1]]), ValueError, "mask[0]"),
    ("combine_mask_2d_t", lambda: _combine(mask=[_mask()[0].reshape(2, 1), _mask()[1]]), ValueError, "mask[0]"),
    ("combine_mask_0d", lambda: _combine(mask=[_mask()[0], _mask()[1].reshape(())]), ValueError, "mask[1]"),
    ("combine_clip_gram_shape", lambda: _combine(clip_gram=torch.rand(2, 2)), ValueError, "clip_gram"),
    ("combine_clip_gram_type", lambda: _combine(clip_gram=[[1.0]]), ValueError, "clip_gram"),
    (
        "combine_clip_gram_fp64",
        lambda: _combine(clip_gram=torch.rand(1, 1, dtype=torch.float64)),
        TypeError,
        "clip_gram",
    ),
    ("combine_clip_gram_device", lambda: _combine(clip_gram=torch.empty(1, 1, device="meta")), ValueError, "clip_gram"),
    ("combine_clip_zero", lambda: _combine(clip_gram=torch.rand(1, 1), clip=0.0), ValueError, "clip"),
    ("combine_clip_nan", lambda: _combine(clip_gram=torch.rand(1, 1), clip=float("nan")), ValueError, "clip"),
    ("combine_clip_type", lambda: _combine(clip_gram=torch.rand(1, 1), clip="1"), TypeError, "clip"),
    ("combine_clip_both", lambda: _combine(clip_gram=torch.rand(1, 1), clip_own=True), ValueError, "clip_own"),
    ("combine_clip_own_zero", lambda: _combine(clip_own=True, clip=-1.0), ValueError, "clip"),
    ("gram_mask_2d", lambda: _gram([P()], mask=[_mask()[0].reshape(2, 1), _mask()[1]]), ValueError, "mask[0]"),
    (
        "combine_state_shape",
        lambda: _combine(state={"momentum_buffer": shape_at(P(), 1)}, momentum=0.9),
        ValueError,
        "momentum_buffer",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_rejected_untouched(case):
    _, build, exc, name = case
    call, objs = build()
    snap = _snapshot(objs)
    with pytest.raises(exc, match=re.escape(name)):
        call()
    for t, before in snap:
        assert _same(t, before), "a rejected call modified its inputs"


def test_checks_ran_before_backend():
    # A valid call after a rejected one still works (no half-applied state left behind).
    f = [torch.rand(s) for s in SHAPES]
    g = P()
    with pytest.raises(TypeError):
        ops.fisher_accumulate_(f, int_at(g, 0))
    f0 = [x.clone() for x in f]
    ops.fisher_accumulate_(f, g, 1.0)
    for x, x0, gg in zip(f, f0, g):
        torch.testing.assert_close(x.double(), x0.double() + gg.double() ** 2, rtol=2e-6, atol=2e-6)
