"""Reference ``combine_step_``: masked role-gradient combination fused with an update rule.

This file is the shared prologue (mask, role weights, scale, AMP unscale, penalty, fused
restore, update-mode selection); each rule's update lives in ``reference/rules/<rule>.py``.
Arguments arrive validated by :func:`fastclu.ops.combine_step_`.

Two formulations, as torch.optim has:

* single-tensor (the specification): a loop over parameters in the op order of torch.optim's
  single-tensor SGD / AdamW (``foreach=False``): one role with coefficient 1, scale 1, no mask /
  penalty / AMP and fp32 parameters is bit-identical to torch's single-tensor step;
* foreach: the same math on ``torch._foreach_*`` per (device, dtype) group, in the op order of
  torch's multi-tensor SGD / AdamW (bit-identical to ``foreach=True`` in that plain case with a
  float lr), with no host read of a device value (AMP's ``found_inf`` selects, it is not read).

Which one runs: the innermost :func:`foreach` scope (``with foreach(False): ...``), else the
environment variable ``FASTCLU_REFERENCE_FOREACH`` (``1`` / ``0``), else automatic: foreach
when every parameter and gradient is a plain tensor (torch's ``_default_to_fused_or_foreach``
rule, minus its device test: the point here is CPU speed) and the rule has an
``update_foreach``.

Within the foreach formulation, a (device, dtype) group whose update a torch fused kernel
computes exactly (the rule's ``fused_eligible``: today AdamW, fp32 parameters and state, CPU or
CUDA, a mask mode other than ``"update"``, which needs the select-back) takes the rule's
``update_fused`` instead of its ``update_foreach``: the same prologue, then one
``torch._fused_adamw_`` (bit-identical to torch's ``fused=True`` step in the plain case; AMP's
``found_inf`` is passed to the kernel, which then leaves everything untouched, instead of being
selected back). On by default; off within a ``with fused(False):`` scope, else when the
environment variable ``FASTCLU_REFERENCE_FUSED`` is ``0`` (``1`` or unset: on; ``fused(True)``
overrides the variable's ``0``). It never changes which formulation runs: the single-tensor one
(``foreach(False)``) never takes a fused kernel.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from fastclu._registry import register
from fastclu.ops.reference._util import WORD, blend_, mask_bools, mask_words, select
from fastclu.ops.reference.gram import gram
from fastclu.ops.reference.rules import update_foreach_of, update_fused_of, update_of
from fastclu.ops.rules import StepConfig

FOREACH_ENV = "FASTCLU_REFERENCE_FOREACH"
_FOREACH_TYPES = (Tensor, torch.nn.Parameter)
_FORCED: ContextVar[bool | None] = ContextVar("fastclu_reference_foreach", default=None)
FUSED_ENV = "FASTCLU_REFERENCE_FUSED"
_FUSED: ContextVar[bool | None] = ContextVar("fastclu_reference_fused", default=None)


@contextlib.contextmanager
def _scoped(var: ContextVar[bool | None], flag: bool | None) -> Iterator[None]:
    token = var.set(flag)
    try:
        yield
    finally:
        var.reset(token)


def foreach(flag: bool | None) -> contextlib.AbstractContextManager[None]:
    """Within the scope, the reference ``combine_step_`` takes the foreach (True) or the
    single-tensor (False) formulation; None: the environment variable, else automatic."""
    return _scoped(_FORCED, flag)


def fused(flag: bool | None) -> contextlib.AbstractContextManager[None]:
    """Within the scope, the foreach formulation of the reference ``combine_step_`` takes a torch
    fused kernel for the groups it computes exactly (True) or never (False); None: the
    environment variable, else on."""
    return _scoped(_FUSED, flag)


def _use_fused() -> bool:
    flag = _FUSED.get()
    if flag is not None:
        return flag
    env = os.environ.get(FUSED_ENV, "")
    if env not in ("", "0", "1"):
        raise ValueError(f"{FUSED_ENV} must be '0', '1' or unset, got {env!r}")
    return env != "0"


Scalar = float | Tensor


def _is(x: Scalar, value: float) -> bool:
    # Only Python floats are known on the host; a tensor scalar is always applied (no sync).
    return isinstance(x, float) and x == value


def _compute_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _work(t: Tensor, dtype: torch.dtype) -> Tensor:
    """The tensor itself when it already has the compute dtype (in-place math), else a copy."""
    return t if t.dtype == dtype else t.to(dtype)


def _combined_grad(
    i: int,
    grads: Sequence[list[Tensor]],
    coeffs: Sequence[Scalar],
    scale: Scalar,
    bits: Tensor | None,
    gate: Sequence[bool],
    dtype: torch.dtype,
) -> Tensor:
    # Never modifies an input gradient: every op below is out of place.
    g: Tensor | None = None
    for r, role in enumerate(grads):
        x = _work(role[i], dtype)
        if bits is not None and gate[r]:
            # Selection, not multiplication: a gated-out element contributes exactly +0,
            # even when the role gradient holds inf/NaN there.
            x = torch.where(bits, x, torch.zeros((), dtype=dtype, device=x.device))
        if not _is(coeffs[r], 1.0):
            x = x * coeffs[r]
        # Start from the first term (0 + x would turn -0.0 into +0.0 and break bit parity).
        g = x if g is None else g + x
    assert g is not None
    if not _is(scale, 1.0):
        g = g * scale
    return g


def _use_foreach(flag: bool | None, rule: str, params: list[Tensor], grads: Sequence[list[Tensor]]) -> bool:
    if flag is None:
        flag = _FORCED.get()
    if flag is None:
        env = os.environ.get(FOREACH_ENV, "")
        if env not in ("", "0", "1"):
            raise ValueError(f"{FOREACH_ENV} must be '0', '1' or unset, got {env!r}")
        flag = None if env == "" else env == "1"
    has_list_form = update_foreach_of(rule) is not None
    if flag is not None:
        if flag and not has_list_form:
            raise ValueError(f"the foreach formulation was asked for, but rule {rule!r} has no update_foreach")
        return flag
    tensors = [*params, *(g for role in grads for g in role)]
    return has_list_form and all(type(t) in _FOREACH_TYPES for t in tensors)


@register("combine_step_", "reference")
def combine_step_(
    params: list[Tensor],
    grads: Sequence[list[Tensor]],
    state: dict[str, list[Tensor]],
    *,
    rule: str,
    lr: Scalar,
    coeffs: Sequence[Scalar],
    scale: Scalar,
    mask: list[Tensor] | None,
    masked: Sequence[bool],
    mask_mode: str,
    penalty: Scalar,
    importance: list[Tensor] | None,
    anchor: list[Tensor] | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    restore_from: list[Tensor] | None,
    maximize: bool,
    clip_gram: Tensor | None = None,
    clip: Scalar = 1.0,
    clip_own: bool = False,
    **hparams: object,
) -> None:
    """See :func:`fastclu.ops.combine_step_` (the contract); this is its specification in PyTorch.

    The formulation (foreach or single-tensor) is chosen as the module docstring says. A clip
    over this call's own combination (``clip_own``) is, in the single-tensor specification, the
    ``clip_gram`` formula on this call's gram; the foreach formulation takes the norm of the
    combined gradient it forms anyway (the same quantity, within rounding; no gram pass).
    """
    cfg = StepConfig(rule, lr, maximize, **hparams)  # type: ignore[arg-type]
    gate = [bool(f) and mask_mode == "grad" for f in masked]
    foreach = _use_foreach(None, rule, params, grads)
    if clip_own and not foreach:
        clip_gram = gram(list(grads), mask=mask if any(gate) else None, masked=gate)
    if clip_gram is not None:
        scale = clip_scale(scale, clip_gram, coeffs, clip, grad_scale)
    prologue = _Prologue(grads, list(coeffs), scale, mask, gate, mask_mode, penalty, importance, anchor, grad_scale)
    prologue.shapes = [p.shape for p in params]
    if foreach:
        _step_foreach(params, state, cfg, prologue, found_inf, restore_from, clip if clip_own else None)
    else:
        _step_single(params, state, cfg, prologue, found_inf, restore_from)


def clip_scale(
    scale: Scalar, gram: Tensor, coeffs: Sequence[Scalar], clip: Scalar, grad_scale: Tensor | None
) -> Tensor:
    """``scale * clip_factor`` as a 0-d fp32 tensor on the gram's device (no host read).

    The contract's formula: fp64 throughout, the coefficients as the kernels read them (fp32),
    ``norm = sqrt(max(c^T G c, 0)) / grad_scale``, ``min(1, clip / (norm + 1e-6))`` with NaN
    kept (``torch.clamp`` propagates it), then fp32 and the product with ``scale`` in fp32.
    Numbers enter as fills (``new_full``: a kernel scalar, no host-to-device copy).
    """
    dev = gram.device
    c = torch.stack([x.to(dev, torch.float32).reshape(()) if isinstance(x, Tensor)
                     else gram.new_full((), x, dtype=torch.float32) for x in coeffs]).double()  # fmt: skip
    return _scaled_factor((c @ gram.to(torch.float64) @ c).clamp_min(0.0).sqrt(), scale, clip, grad_scale)


def _scaled_factor(norm: Tensor, scale: Scalar, clip: Scalar, grad_scale: Tensor | None) -> Tensor:
    """``scale * min(1, clip / (norm / grad_scale + 1e-6))``: ``norm`` a 0-d fp64 tensor."""
    dev = norm.device
    if grad_scale is not None:
        norm = norm / grad_scale.to(dev, torch.float64).reshape(())
    bound = clip.to(dev, torch.float64).reshape(()) if isinstance(clip, Tensor) else clip
    factor = (bound / (norm + 1e-6)).clamp(max=1.0).to(torch.float32)
    if _is(scale, 1.0):
        return factor
    return factor * (scale.to(dev, torch.float32).reshape(()) if isinstance(scale, Tensor) else scale)


class _Prologue:
    """Everything the update reads besides the parameters and state: the gradient's recipe."""

    def __init__(self, grads, coeffs, scale, mask, gate, mask_mode, penalty, importance, anchor, grad_scale):
        self.grads, self.coeffs, self.scale, self.mask, self.gate = grads, coeffs, scale, mask, gate
        self.shapes: list[torch.Size] = []
        self.mask_mode, self.importance, self.anchor = mask_mode, importance, anchor
        self.penalty = penalty if importance is not None and not _is(penalty, 0.0) else None
        self.grad_scale = None if grad_scale is None else grad_scale.reshape(())

    def bools(self) -> list[Tensor] | None:
        """The masks as bool tensors (the single-tensor path's ``where``)."""
        return None if self.mask is None else mask_bools(self.mask, self.shapes)

    def words(self, dtype: torch.dtype) -> list[Tensor] | None:
        """The masks as words of ``dtype``'s width (the foreach path's bitwise select)."""
        return None if self.mask is None else mask_words(self.mask, self.shapes, dtype)


def _restore(params: list[Tensor], restore_from: list[Tensor] | None) -> None:
    # The restore is not part of the step: it happens even when AMP skips the update,
    # otherwise a skipped step would leave the weights perturbed.
    if restore_from is None:
        return
    pairs = [(p, src) for p, src in zip(params, restore_from) if p is not src]
    if pairs:
        torch._foreach_copy_([p for p, _ in pairs], [src for _, src in pairs])


# ---------------------------------------------------------------------------------- single-tensor


def _step_single(
    params: list[Tensor],
    state: dict[str, list[Tensor]],
    cfg: StepConfig,
    pro: _Prologue,
    found_inf: Tensor | None,
    restore_from: list[Tensor] | None,
) -> None:
    _restore(params, restore_from)
    if found_inf is not None and float(found_inf.reshape(())) != 0.0:
        return
    update = update_of(cfg.rule)
    state_keys = [k for k in cfg.state_keys if k != "step"]
    bits = pro.bools()
    for i, p in enumerate(params):
        dtype = _compute_dtype(p)
        theta = _work(p, dtype)
        bufs = {k: _work(state[k][i], dtype) for k in state_keys}
        if pro.mask_mode == "update":
            old_theta = theta.clone()
            old_bufs = {k: b.clone() for k, b in bufs.items()}

        g = _combined_grad(i, pro.grads, pro.coeffs, pro.scale, bits[i] if bits else None, pro.gate, dtype)
        if pro.grad_scale is not None:
            g = g / pro.grad_scale
        if pro.penalty is not None:
            g = g + pro.penalty * _work(pro.importance[i], dtype) * (theta - _work(pro.anchor[i], dtype))
        if cfg.maximize:
            g = -g

        update(theta, g, bufs, state["step"][i] if cfg.counts_steps else None, cfg)

        if pro.mask_mode == "update":
            # Masked-out weights and their optimizer state do not move at all.
            theta.copy_(torch.where(bits[i], theta, old_theta))
            for k, b in bufs.items():
                b.copy_(torch.where(bits[i], b, old_bufs[k]))
        if theta is not p:
            p.copy_(theta)
        for k, b in bufs.items():
            if b is not state[k][i]:
                state[k][i].copy_(b)


# ---------------------------------------------------------------------------------------- foreach


def _on(x: Scalar, device: torch.device) -> Scalar:
    # A 0-d tensor scalar of a foreach op must live on the lists' device.
    return x.to(device) if isinstance(x, Tensor) and x.device != device else x


def _works(ts: list[Tensor], dtype: torch.dtype) -> tuple[list[Tensor], bool]:
    """(the tensors in the compute dtype, whether every one of them is a fresh copy)."""
    out = [_work(t, dtype) for t in ts]
    return out, all(o is not t for o, t in zip(out, ts))


def _combined_grads(
    idx: list[int], pro: _Prologue, dtype: torch.dtype, device: torch.device, summed: tuple | None = None
) -> tuple[list[Tensor], bool]:
    """The group's combined gradients (:func:`_role_sum` unless ``summed`` holds it, times the
    scale) and whether they are scratch (safe to modify in place)."""
    g, owned = summed if summed is not None else _role_sum(idx, pro, dtype, device)
    if not _is(pro.scale, 1.0):
        g, owned = _scaled(g, owned, torch._foreach_mul, torch._foreach_mul_, _on(pro.scale, device))
    return g, owned


def _role_sum(idx: list[int], pro: _Prologue, dtype: torch.dtype, device: torch.device) -> tuple[list[Tensor], bool]:
    """The group's weighted, gated role sum (before the scale) and whether it is scratch.

    The math of :func:`_combined_grad`, never modifying an input gradient, with fewer passes:
    roles whose coefficient is exactly 1.0 come first, and a float coefficient is fused into its
    addition (``add(alpha=c)``, one rounding instead of two): within rounding of the
    single-tensor sum, equal to it for one role or coefficients of +-1.
    """
    g: list[Tensor] | None = None
    owned = False
    words = pro.words(dtype) if any(pro.gate) else None
    order = sorted(range(len(pro.grads)), key=lambda r: not _is(pro.coeffs[r], 1.0))
    for r in order:
        x, fresh = _works([pro.grads[r][i] for i in idx], dtype)
        if words is not None and pro.gate[r]:
            x, fresh = [select(t, words[i]) for i, t in zip(idx, x)], True
        c = _on(pro.coeffs[r], device)
        if g is not None and isinstance(c, float):
            if owned:
                torch._foreach_add_(g, x, alpha=c)
            elif fresh:  # x is scratch (a selection): the sum lands in it, rounded as add(g, x, alpha=c)
                for gi, xi in zip(g, x):
                    torch.add(gi, xi, alpha=c, out=xi)
                g, owned = x, True
            else:
                g, owned = torch._foreach_add(g, x, alpha=c), True
            continue
        if not _is(c, 1.0):
            x, fresh = _scaled(x, fresh, torch._foreach_mul, torch._foreach_mul_, c)
        if g is None:
            g, owned = x, fresh
        else:
            g, owned = _scaled(g, owned, torch._foreach_add, torch._foreach_add_, x)
    assert g is not None
    return g, owned


def _scaled(g: list[Tensor], owned: bool, op: Callable, op_: Callable, x: Scalar) -> tuple[list[Tensor], bool]:
    if owned:
        op_(g, x)
        return g, True
    return op(g, x), True


def _final_grads(
    idx: list[int],
    thetas: list[Tensor],
    pro: _Prologue,
    cfg: StepConfig,
    dtype: torch.dtype,
    device: torch.device,
    summed: tuple | None = None,
) -> list[Tensor]:
    g, owned = _combined_grads(idx, pro, dtype, device, summed)
    if pro.grad_scale is not None:
        g, owned = _scaled(g, owned, torch._foreach_div, torch._foreach_div_, _on(pro.grad_scale, device))
    if pro.penalty is not None:
        imp, _ = _works([pro.importance[i] for i in idx], dtype)
        anc, _ = _works([pro.anchor[i] for i in idx], dtype)
        term = torch._foreach_mul(imp, _on(pro.penalty, device))  # penalty * importance
        torch._foreach_mul_(term, torch._foreach_sub(thetas, anc))  # ... * (theta - anchor)
        g, owned = _scaled(g, owned, torch._foreach_add, torch._foreach_add_, term)
    if cfg.maximize:
        g, owned = _scaled(g, owned, lambda xs, _: torch._foreach_neg(xs), lambda xs, _: torch._foreach_neg_(xs), None)
    return g


def _step_foreach(
    params: list[Tensor],
    state: dict[str, list[Tensor]],
    cfg: StepConfig,
    pro: _Prologue,
    found_inf: Tensor | None,
    restore_from: list[Tensor] | None,
    clip_own: Scalar | None = None,
) -> None:
    _restore(params, restore_from)
    if not params:
        return
    groups = list(_group_tensors_by_device_and_dtype([params], with_indices=True).items())
    sums: dict = {}
    if clip_own is not None:  # every group's role sum first: the clip's norm spans the whole call
        for (device, dtype), (_, idx) in groups:
            sums[device, dtype] = _role_sum(
                idx, pro, torch.float64 if dtype == torch.float64 else torch.float32, device
            )
        norms = [n.double() for g, _ in sums.values() for n in torch._foreach_norm(g)]
        pro.scale = _scaled_factor(torch.linalg.vector_norm(torch.stack(norms)), pro.scale, clip_own, pro.grad_scale)
    update_foreach = update_foreach_of(cfg.rule)
    fused_rule = update_fused_of(cfg.rule) if pro.mask_mode != "update" and _use_fused() else None
    keys = [k for k in cfg.state_keys if k != "step"]
    has_step = "step" in cfg.state_keys
    for (device, dtype), ((ps,), idx) in groups:
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        summed = sums.get((device, dtype))
        thetas, _ = _works(ps, cd)
        bufs = {k: _works([state[k][i] for i in idx], cd)[0] for k in keys}
        steps = [state["step"][i] for i in idx] if has_step else None
        if fused_rule is not None and dtype == cd and fused_rule.eligible(thetas, bufs, steps, cfg, device):
            # thetas and bufs are the parameters and state themselves: nothing to write back.
            g = _final_grads(idx, thetas, pro, cfg, cd, device, summed)
            fused_rule.update(thetas, g, bufs, steps, cfg, found_inf=found_inf)
            continue
        # AMP without a host read: the step runs, then found_inf selects the old values back.
        keep = None if found_inf is None else _on(found_inf, device).reshape(()) == 0
        select = pro.mask_mode == "update" or keep is not None
        if select:
            old = ([t.clone() for t in thetas], {k: [b.clone() for b in bs] for k, bs in bufs.items()})
            old_steps = [s.clone() for s in steps] if steps is not None and keep is not None else None

        g = _final_grads(idx, thetas, pro, cfg, cd, device, summed)
        update_foreach(thetas, g, bufs, steps, cfg)

        if select:
            _select_back(idx, pro, keep, cd, thetas, bufs, old)
            if old_steps is not None:
                for st, o in zip(steps, old_steps):
                    blend_(st, o, _word(keep, st.dtype))
        _write_back(ps, thetas)
        for k in keys:
            _write_back([state[k][i] for i in idx], bufs[k])


def _word(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """The 0-d word of ``dtype``'s width for a 0-d bool: all bits set if True, else 0."""
    return keep.to(WORD[dtype]).neg_()


def _select_back(
    idx: list[int],
    pro: _Prologue,
    keep: Tensor | None,
    dtype: torch.dtype,
    thetas: list[Tensor],
    bufs: dict[str, list[Tensor]],
    old: tuple[list[Tensor], dict[str, list[Tensor]]],
) -> None:
    """Where the mask (update mode) is 0, or when AMP found an inf, the pre-step values return."""
    words = pro.words(dtype) if pro.mask_mode == "update" else None
    keep_word = None if keep is None else _word(keep, dtype)
    for new, prev in ((thetas, old[0]), *((bufs[k], old[1][k]) for k in bufs)):
        for i, t, o in zip(idx, new, prev):
            if words is not None:
                blend_(t, o, words[i])
            if keep_word is not None:
                blend_(t, o, keep_word)


def _write_back(dst: list[Tensor], src: list[Tensor]) -> None:
    pairs = [(d, s) for d, s in zip(dst, src) if d is not s]
    if pairs:
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
