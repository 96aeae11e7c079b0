"""CUDA backend: ``combine_step_`` (masked role combination fused into an update rule).

Nothing here knows a rule: the kernel gets the rule's id, its float slots and switches
(:data:`fastclu.ops.rules.RULES`), its state lists in the table's state rows, and, for a rule
that keeps step counters, those counters incremented and a way to read them (``step_mode``).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from fastclu import _C
from fastclu._registry import implementation, register
from fastclu.ops.cuda._launch import build_table, on_device, require_cuda, scalar, stream_of
from fastclu.ops.rules import RULES, StepConfig
from fastclu.ops.tables import TABLES, CombineRow, combine_operands

Scalar = float | Tensor
_is_cuda = Tensor.is_cuda.__get__
_device = operator.attrgetter("device")
_dtype = operator.attrgetter("dtype")


def _is(x: Scalar, value: float) -> bool:
    return isinstance(x, float) and x == value


def _step_source(
    steps: list[Tensor], found_inf: Tensor | None, dev: torch.device
) -> tuple[int, float, Tensor | None, bool]:
    """Say how the kernel gets a rule's step counters (incrementing host ones here).

    Returns ``(step_mode, step, steps_on_device, skip)``. Device counters: mode 3, the step's own
    launch increments them (by 0 when ``found_inf`` is set, so no sync) before the fused kernel
    reads them; see :func:`_advance_steps` for a step with an empty tensor. CPU counters are
    incremented on the host, which needs the value of a device ``found_inf`` (one sync).
    """
    on_dev = list(map(_is_cuda, steps))  # C-level passes: no Python work per tensor per step
    if steps and all(on_dev):
        if set(map(_device, steps)) != {dev} or set(map(_dtype, steps)) != {torch.float32}:
            for i, s in enumerate(steps):
                if s.device != dev or s.dtype != torch.float32:
                    raise TypeError(
                        f"state['step'][{i}] must be an fp32 tensor on {dev} or on the CPU, got {s.dtype} on {s.device}"
                    )
        return 3, 1.0, None, False
    if any(on_dev):
        raise ValueError("state['step'] must be all on the params' device or all on the CPU")
    if found_inf is not None and float(found_inf.reshape(())) != 0.0:
        return 0, 1.0, None, True
    values = []
    for s in steps:
        s += 1
        values.append(float(s.reshape(())))
    if len(set(values)) <= 1:
        return 0, values[0] if values else 1.0, None, False
    arr = torch.tensor(values, dtype=torch.float32).pin_memory().to(dev, non_blocking=True)
    return 1, 1.0, arr, False


def _advance_steps(steps: list[Tensor], found_inf: Tensor | None, dev: torch.device) -> None:
    """Device counters advanced by torch instead of the launch (mode 3 -> 2): an empty tensor has
    no table row, but its counter counts like every other (as torch's)."""
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
    else:
        inc = (found_inf.reshape(()).to(device=dev, dtype=torch.float32) == 0).to(torch.float32)
        torch._foreach_add_(steps, [inc] * len(steps))


@register("combine_step_", "cuda")
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
    """One ``_C`` call per step over every parameter: the fused launch, after a tiny one that
    advances device step counters (and one forming the clip factor, with a clip).

    Operand table: params, restore_from, 4 role grads, mask, 3 state buffers, importance,
    anchor, step counter. State buffers and grads may be fp32/fp16/bf16; math is fp32.
    """
    op = "combine_step_"
    cfg = StepConfig(rule, lr, maximize, **hparams)  # type: ignore[arg-type]
    rows = cfg.state_rows
    keys = [k for k in rows if k is not None]
    bufs = [state[k] for k in keys]
    named = [("params", params), ("mask", mask), ("importance", importance), ("anchor", anchor),
             ("restore_from", restore_from)] + [(f"grads[{r}]", g) for r, g in enumerate(grads)] + [
             (f"state[{k!r}]", b) for k, b in zip(keys, bufs)]  # fmt: skip
    for name, xs in named:
        if xs is not None:
            require_cuda(op, name, xs)
    if not params:
        return
    if clip_own:  # the clip's gram is this call's own: the gating the step applies
        gated = [bool(f) and mask is not None and mask_mode == "grad" for f in masked]
        # through the registry, as every op call is (the kernel-call counters see it)
        gram = implementation("gram", "cuda")
        clip_gram = gram(list(grads), mask=mask if any(gated) else None, masked=gated)
    dev = params[0].device
    with on_device(dev):
        fi_ptr = 0
        fi_keep = None
        if found_inf is not None:
            if found_inf.device.type != dev.type:  # (CPU mode: CPU tensors stand for device ones)
                if float(found_inf.reshape(())) != 0.0:  # host value: skip right here
                    if restore_from is not None:  # the restore is not part of the skipped step
                        torch._foreach_copy_(params, restore_from)
                    return
            else:
                fi_keep = found_inf.reshape(()).to(device=dev, dtype=torch.float32)
                fi_ptr = fi_keep.data_ptr()
        step_mode, step, steps_arr, skip = 0, 1.0, None, False
        steps = state["step"] if cfg.counts_steps else None
        if steps is not None:
            step_mode, step, steps_arr, skip = _step_source(list(steps), found_inf, dev)
            if skip:  # CPU counters and a device found_inf that is set (already synced)
                if restore_from is not None:
                    torch._foreach_copy_(params, restore_from)
                return
        roles: list[list[Tensor] | None] = [list(grads[r]) if r < len(grads) else None for r in range(4)]
        state_ops: list[list[Tensor] | None] = [None if k is None else state[k] for k in rows]
        has_penalty = importance is not None and not _is(penalty, 0.0)
        operands = combine_operands(
            params, restore_from, roles, mask, state_ops, importance if has_penalty else None,
            anchor if has_penalty else None, list(steps) if step_mode == 3 else None,
        )  # fmt: skip
        t = build_table(
            op, operands, dev, pointer_operands=(int(CombineRow.STEP),), dynamic=TABLES["combine_step"].dynamic
        )
        if step_mode == 3 and t.n_rows != len(params):
            _advance_steps(list(steps), found_inf, dev)
            step_mode = 2
        scal = {
            name: scalar(v, dev) for name, v in (("lr", lr), ("scale", scale), ("penalty", penalty), ("clip", clip))
        }
        cgram = None if clip_gram is None else clip_gram.contiguous()
        # the clip factor's scratch: written by the clip launch, read by the step (stream-ordered)
        clip_out = None if cgram is None else torch.empty((), dtype=torch.float32, device=cgram.device)
        coeff = [scalar(c, dev) for c in coeffs]
        gs = scalar(grad_scale, dev) if grad_scale is not None else None
        bits = sum(1 << r for r, f in enumerate(masked) if f) if mask is not None else 0
        config = {
            "rule": RULES[rule].id, "n_roles": len(grads), "masked_bits": bits, "update_mode": mask_mode == "update",
            "has_mask": mask is not None, "has_restore": restore_from is not None, "has_penalty": has_penalty,
            "maximize": bool(maximize), "hparams": list(cfg.slots), "flags": list(cfg.flags), "lr": scal["lr"].pair,
            "scale": scal["scale"].pair, "penalty": scal["penalty"].pair,
            "grad_scale": gs.pair if gs is not None else (1.0, 0), "has_grad_scale": gs is not None,
            "coeffs": [c.pair for c in coeff], "found_inf_ptr": fi_ptr, "step_mode": step_mode, "step": step,
            "clip_gram_ptr": 0 if cgram is None else cgram.data_ptr(), "clip": scal["clip"].pair,
            "clip_out_ptr": 0 if clip_out is None else clip_out.data_ptr(),
            "steps_ptr": 0 if steps_arr is None else steps_arr.data_ptr(),
        }  # fmt: skip
        _C.combine_step(*t.args, config, stream_of(dev))
        # Tensors whose addresses the launch uses stay referenced until here (stream-ordered reuse
        # by the caching allocator makes freeing them afterwards safe).
        del scal, coeff, gs, fi_keep, steps_arr, cgram, clip_out
