"""The fused step: saliency-masked role-gradient combination + an update rule, one launch per group.

This file is the shared prologue (mask, role weights, scale, AMP unscale, penalty, fused
restore, update-mode selection); the rule's update is a Triton function from
``fastclu/ops/triton/rules/<rule>.py``, passed to the kernel as the constexpr ``RULE``.

Per element, everything in fp32 (see :func:`fastclu.ops.combine_step_` and the reference,
whose op order is followed so fp32 results agree to rounding): gate and weight the role
gradients, scale, unscale (AMP), add the EWC penalty, negate for maximize, then torch's
the rule's update. Every scalar may be a 0-d device tensor, read in the kernel: no host sync,
so a step (after a first, table-building call) can be captured in a CUDA graph.

Nothing here knows a rule: its state lists fill the table's state rows in the order the rule
declares them (:attr:`fastclu.ops.rules.StepConfig.state_rows`), its hyperparameters travel as
its float slots and switches, and its host pre-work (AdamW: counting steps and forming bias
corrections) is the rule file's ``prepare`` hook, whose per-tensor ``coef`` the kernel passes on.
"""

from __future__ import annotations

from collections.abc import Sequence

import triton
import triton.language as tl
from torch import Tensor

from fastclu._registry import implementation, register
from fastclu.ops.rules import StepConfig
from fastclu.ops.tables import TABLES, combine_operands
from fastclu.ops.tables import CombineRow as R_
from fastclu.ops.triton._multitensor import (
    BLOCK,
    C_NUMEL,
    block_start,
    f64,
    groups,
    helper,
    launch,
    load_scalar,
    on_device,
    operand_ptr,
    row_field,
    scalar_arg,
    table_args,
    tl_dtype,
)
from fastclu.ops.triton._rows import (
    ROW_ANCHOR,
    ROW_GRAD0,
    ROW_IMPORTANCE,
    ROW_MASK,
    ROW_PARAM,
    ROW_RESTORE,
)
from fastclu.ops.triton.masks import load_bits
from fastclu.ops.triton.rules import GroupLaunch, prepare_of, split_double, update_of


@helper
def _role(
    tab,
    dyn,
    LAYOUT: tl.constexpr,
    ROW: tl.constexpr,
    t,
    offs,
    m,
    bit,
    D: tl.constexpr,
    GATE: tl.constexpr,
    c,
    ALIGN: tl.constexpr,
):
    x = tl.load(operand_ptr(tab, dyn, LAYOUT, ROW, t, D, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
    if GATE:
        x = tl.where(bit, x, 0.0)  # selection: inf/NaN under a 0 bit contributes +0
    return x * c


@helper
def _pick(c0, c1, c2, c3, r: tl.constexpr):
    x = c0
    if r == 1:
        x = c1
    if r == 2:
        x = c2
    if r == 3:
        x = c3
    return x


@helper
def _clip_factor(cg_ptr, c0, c1, c2, c3, cl_ptr, cl_hi, cl_lo, CL_T: tl.constexpr, gs_ptr, HAS_GS: tl.constexpr,
                 R: tl.constexpr):  # fmt: skip
    """``min(1, clip / (sqrt(max(c^T G c, 0)) / grad_scale + 1e-6))`` in fp64 (the contract's formula)."""
    n2 = tl.cast(0.0, tl.float64)
    for r in tl.static_range(R):
        v = tl.cast(0.0, tl.float64)
        for q in tl.static_range(R):
            v += _pick(c0, c1, c2, c3, q).to(tl.float64) * tl.load(cg_ptr + q * R + r).to(tl.float64)
        n2 += v * _pick(c0, c1, c2, c3, r).to(tl.float64)
    norm = tl.sqrt(tl.where(n2 < 0.0, 0.0, n2))  # not tl.maximum: a NaN must stay NaN
    if HAS_GS:
        norm = norm / tl.load(gs_ptr).to(tl.float64)
    bound = tl.load(cl_ptr).to(tl.float64) if CL_T else f64(cl_hi, cl_lo)
    f = bound / (norm + 1e-6)
    return tl.where(f > 1.0, 1.0, f).to(tl.float32)  # a NaN norm stays NaN, as torch.clamp keeps it


@triton.jit
def _combine_kernel(
    tab, dyn, n_rows,
    lr_ptr, lr_val, lr_hi, lr_lo, c0_ptr, c0_val, c1_ptr, c1_val, c2_ptr, c2_val, c3_ptr, c3_val,
    sc_ptr, sc_val, pen_ptr, pen_val, gs_ptr, fi_ptr, coef, cg_ptr, cl_ptr, cl_hi, cl_lo,
    h0, h0_lo, h1, h1_lo, h2, h2_lo, h3, h3_lo, h4, h4_lo, h5, h5_lo,
    blk0, LR_T: tl.constexpr, C0_T: tl.constexpr, C1_T: tl.constexpr, C2_T: tl.constexpr, C3_T: tl.constexpr,
    SC_T: tl.constexpr, PEN_T: tl.constexpr, CLIP: tl.constexpr, CL_T: tl.constexpr,
    R: tl.constexpr, GATE0: tl.constexpr, GATE1: tl.constexpr, GATE2: tl.constexpr, GATE3: tl.constexpr,
    HAS_MASK: tl.constexpr, UPDATE: tl.constexpr, HAS_PEN: tl.constexpr, HAS_GS: tl.constexpr,
    HAS_FI: tl.constexpr, RESTORE: tl.constexpr, RULE: tl.constexpr, MAXIMIZE: tl.constexpr,
    F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
    DP: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    DB0: tl.constexpr, DB1: tl.constexpr, DB2: tl.constexpr, DI: tl.constexpr, DA: tl.constexpr,
    DR: tl.constexpr, BLOCK: tl.constexpr,
    EVEN: tl.constexpr, ALIGN: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    # block_info's offsets and mask, with the block start kept for the mask bytes
    t, start = block_start(tab, n_rows, tl.program_id(0) + blk0, BLOCK, EVEN, LAYOUT)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    m = tl.full([BLOCK], 1, tl.int1) if EVEN else offs < row_field(tab, t, C_NUMEL, LAYOUT)
    pp = operand_ptr(tab, dyn, LAYOUT, ROW_PARAM, t, DP, ALIGN)

    # `live`: lanes the step may write at all (in bounds, and not an AMP found-inf step: a
    # block-uniform predicate, so stores under it stay vectorised); `go`: lanes that move (a 0
    # mask bit in update mode freezes the entry: it is written back with its loaded bits)
    live = m
    if HAS_FI:
        # broadcast first: the interpreter cannot `&` a 0-d bool with a block of bools
        fi = tl.zeros([BLOCK], dtype=tl.float32) + tl.load(fi_ptr).to(tl.float32)
        live = live & (fi == 0.0)
    if HAS_MASK:
        bit = load_bits(operand_ptr(tab, dyn, LAYOUT, ROW_MASK, t, tl.uint8, ALIGN), tab, t, start, BLOCK, EVEN, LAYOUT)
    else:
        bit = m
    go = live & bit if UPDATE else live

    if RESTORE:
        theta_raw = tl.load(operand_ptr(tab, dyn, LAYOUT, ROW_RESTORE, t, DR, ALIGN) + offs, mask=m, other=0.0)
        # the restore itself is not part of the step: clean weights land in params regardless
        theta_old = theta_raw.to(DP)
    else:
        theta_old = tl.load(pp + offs, mask=m, other=0.0)
    theta = theta_old.to(tl.float32)

    c0 = load_scalar(c0_ptr, c0_val, C0_T)
    c1 = load_scalar(c1_ptr, c1_val, C1_T)
    c2 = load_scalar(c2_ptr, c2_val, C2_T)
    c3 = load_scalar(c3_ptr, c3_val, C3_T)
    g = _role(tab, dyn, LAYOUT, ROW_GRAD0, t, offs, m, bit, D0, GATE0, c0, ALIGN)
    if R > 1:
        g = g + _role(tab, dyn, LAYOUT, ROW_GRAD0 + 1, t, offs, m, bit, D1, GATE1, c1, ALIGN)
    if R > 2:
        g = g + _role(tab, dyn, LAYOUT, ROW_GRAD0 + 2, t, offs, m, bit, D2, GATE2, c2, ALIGN)
    if R > 3:
        g = g + _role(tab, dyn, LAYOUT, ROW_GRAD0 + 3, t, offs, m, bit, D3, GATE3, c3, ALIGN)
    sc = load_scalar(sc_ptr, sc_val, SC_T)
    if CLIP:
        sc = sc * _clip_factor(cg_ptr, c0, c1, c2, c3, cl_ptr, cl_hi, cl_lo, CL_T, gs_ptr, HAS_GS, R)
    g = g * sc
    if HAS_GS:
        g = g / tl.load(gs_ptr).to(tl.float32)
    if HAS_PEN:
        imp = tl.load(operand_ptr(tab, dyn, LAYOUT, ROW_IMPORTANCE, t, DI, ALIGN) + offs, mask=m, other=0.0).to(
            tl.float32
        )
        anc = tl.load(operand_ptr(tab, dyn, LAYOUT, ROW_ANCHOR, t, DA, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
        g = g + (load_scalar(pen_ptr, pen_val, PEN_T) * imp) * (theta - anc)
    if MAXIMIZE:
        g = -g

    if LR_T:
        lr32 = tl.load(lr_ptr).to(tl.float32)
        lr64 = lr32.to(tl.float64)
    else:
        lr32 = tl.cast(lr_val, tl.float32)
        lr64 = f64(lr_hi, lr_lo)

    # the rule's own update (one file per rule: fastclu/ops/triton/rules/<rule>.py), a constexpr
    theta = RULE(
        theta, g, lr32, lr64, tab, LAYOUT, t, offs, live, go, coef,
        h0, h0_lo, h1, h1_lo, h2, h2_lo, h3, h3_lo, h4, h4_lo, h5, h5_lo, F0, F1, F2, F3, DB0, DB1, DB2, ALIGN,
    )  # fmt: skip

    new = tl.where(go, theta.to(DP), theta_old)
    # a fused restore writes the clean weights even on a skipped step
    tl.store(pp + offs, new, mask=m if RESTORE else live)


@register("combine_step_", "triton")
@on_device
def combine_step_(
    params: list[Tensor],
    grads: Sequence[list[Tensor]],
    state: dict[str, list[Tensor]],
    *,
    rule: str,
    lr: float | Tensor,
    coeffs: Sequence[float | Tensor],
    scale: float | Tensor,
    mask: list[Tensor] | None,
    masked: Sequence[bool],
    mask_mode: str,
    penalty: float | Tensor,
    importance: list[Tensor] | None,
    anchor: list[Tensor] | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    restore_from: list[Tensor] | None,
    maximize: bool,
    clip_gram: Tensor | None = None,
    clip: float | Tensor = 1.0,
    clip_own: bool = False,
    **hparams: object,
) -> None:
    """Fused combination + the rule's step; see :func:`fastclu.ops.combine_step_` (the contract)."""
    if not params:
        return
    dev = params[0].device
    # the kernels dereference these: one left on the host (the contract allows any 1-element tensor)
    # would be read through a host address on the GPU
    if grad_scale is not None and grad_scale.device != dev:
        grad_scale = grad_scale.to(dev)
    if found_inf is not None and found_inf.device != dev:
        found_inf = found_inf.to(dev)
    R = len(grads)
    gate = [bool(f) and mask is not None and mask_mode == "grad" for f in masked] + [False] * (4 - R)
    if clip_own:  # the clip's gram is this call's own: the gating the step applies
        # through the registry, as every op call is (the kernel-call counters see it)
        gram = implementation("gram", "triton")
        clip_gram = gram(list(grads), mask=mask if any(gate) else None, masked=gate[:R])
    if clip_gram is not None:
        clip_gram = clip_gram.contiguous()
    cfg = StepConfig(rule, lr, maximize, **hparams)  # type: ignore[arg-type]
    bufs = [None if k is None else state[k] for k in cfg.state_rows]
    steps, rule_coef = prepare_of(rule)(state["step"] if cfg.counts_steps else None, cfg, lr, found_inf, dev)
    slots = [x for v in cfg.slots for x in split_double(v)]
    flags = cfg.flags
    has_pen = importance is not None and not (isinstance(penalty, float) and penalty == 0.0)
    ops = combine_operands(params, restore_from, list(grads), mask, bufs, importance if has_pen else None,
                           anchor if has_pen else None, steps)  # fmt: skip
    gs_list, _ = groups(ops, dynamic=TABLES["combine_step"].dynamic)
    for g in gs_list:
        dummy = g.tab
        lr_p, lr_v, lr_t = scalar_arg(lr, dev, dummy)
        lr_hi, lr_lo = split_double(lr_v)
        cs = [scalar_arg(c, dev, dummy) for c in coeffs] + [(dummy, 1.0, False)] * (4 - R)
        sc = scalar_arg(scale, dev, dummy)
        cl = scalar_arg(clip, dev, dummy)
        cl_hi, cl_lo = split_double(cl[1])
        pen = scalar_arg(penalty, dev, dummy)
        gsv = dummy if grad_scale is None else grad_scale
        fiv = dummy if found_inf is None else found_inf
        dt = [tl_dtype(d) for d in g.dtypes]
        coef = None
        if rule_coef is not None:
            coef = rule_coef(GroupLaunch(g, dev, (lr_p, lr_v, lr_hi, lr_lo, lr_t), found_inf, dummy, dt[R_.STEP]))
        if g.n_blocks:
            launch(_combine_kernel, g,
                *table_args(g),
                lr_p, lr_v, lr_hi, lr_lo, cs[0][0], cs[0][1], cs[1][0], cs[1][1], cs[2][0], cs[2][1],
                cs[3][0], cs[3][1], sc[0], sc[1], pen[0], pen[1], gsv, fiv, dummy if coef is None else coef,
                dummy if clip_gram is None else clip_gram, cl[0], cl_hi, cl_lo,
                *slots,
                LR_T=lr_t, C0_T=cs[0][2], C1_T=cs[1][2], C2_T=cs[2][2], C3_T=cs[3][2], SC_T=sc[2], PEN_T=pen[2],
                CLIP=clip_gram is not None, CL_T=cl[2],
                R=R, GATE0=gate[0], GATE1=gate[1], GATE2=gate[2], GATE3=gate[3],
                HAS_MASK=mask is not None, UPDATE=mask_mode == "update", HAS_PEN=has_pen,
                HAS_GS=grad_scale is not None, HAS_FI=found_inf is not None, RESTORE=restore_from is not None,
                RULE=update_of(rule), MAXIMIZE=bool(maximize), F0=flags[0], F1=flags[1], F2=flags[2], F3=flags[3],
                DP=dt[R_.PARAM], D0=dt[R_.GRAD0], D1=dt[R_.GRAD0 + 1], D2=dt[R_.GRAD0 + 2], D3=dt[R_.GRAD0 + 3],
                DB0=dt[R_.STATE0], DB1=dt[R_.STATE1], DB2=dt[R_.STATE_MAX], DI=dt[R_.IMPORTANCE],
                DA=dt[R_.ANCHOR], DR=dt[R_.RESTORE], BLOCK=BLOCK,
            )  # fmt: skip
