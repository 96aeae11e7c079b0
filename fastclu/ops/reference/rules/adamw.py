"""AdamW (decoupled weight decay, optional AMSGrad) in torch.optim.adam's op order."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from fastclu.ops.reference import _util
from fastclu.ops.rules import StepConfig


def update(theta: Tensor, g: Tensor, bufs: dict[str, Tensor], step: Tensor | None, cfg: StepConfig) -> None:
    """In place on ``theta``, the moment buffers and the 0-d ``step`` counter.

    Bias corrections in Python floats, a tensor lr kept a tensor, as torch's single-tensor AdamW
    does. A counter or lr that cannot be read on the host (meta, or an accelerator under
    tracing) takes :func:`update_foreach`'s tensor formulas instead.
    """
    assert step is not None
    if not _util.host_readable(step, cfg.lr):
        update_foreach([theta], [g], {k: [b] for k, b in bufs.items()}, [step], cfg)
        return
    beta1, beta2 = cfg.betas
    lr = cfg.lr
    exp_avg, exp_avg_sq = bufs["exp_avg"], bufs["exp_avg_sq"]
    step += 1
    if cfg.weight_decay != 0:
        theta.mul_(1 - lr * cfg.weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    n = step.item()
    bias_correction1 = 1 - beta1**n
    bias_correction2 = 1 - beta2**n
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    if cfg.amsgrad:
        max_sq = bufs["max_exp_avg_sq"]
        torch.maximum(max_sq, exp_avg_sq, out=max_sq)
        denom = (max_sq.sqrt() / bias_correction2_sqrt).add_(cfg.eps)
    else:
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(cfg.eps)
    theta.addcdiv_(exp_avg, denom, value=-step_size)


def update_foreach(
    thetas: list[Tensor], gs: list[Tensor], bufs: dict[str, list[Tensor]], steps: list[Tensor] | None, cfg: StepConfig
) -> None:
    """:func:`update` over lists with ``torch._foreach_*``, in torch.optim.adam._multi_tensor_adam's
    op order. ``gs`` is read, never written; ``steps`` (0-d counters) are incremented.

    CPU counters (and a float or CPU tensor lr): bias corrections are Python floats read from
    the counters, as torch's non-capturable foreach path does, and the step sizes are formed as
    torch's single-tensor path forms them (``lr / bc`` in the lr's dtype for a tensor lr):
    bit-identical to both for a float lr, to the single-tensor path for a tensor lr. Otherwise
    (counters or lr on an accelerator or the meta device, tracing) they are formed from the
    counters with tensor ops, as torch's capturable path does: no host read, within rounding of
    the float path (``beta ** step`` is taken in the counters' fp32).
    """
    assert steps is not None
    beta1, beta2 = cfg.betas
    lr = cfg.lr
    exp_avgs, exp_avg_sqs = bufs["exp_avg"], bufs["exp_avg_sq"]
    torch._foreach_add_(steps, 1.0)
    if cfg.weight_decay != 0:
        torch._foreach_mul_(thetas, 1 - lr * cfg.weight_decay)
    torch._foreach_lerp_(exp_avgs, gs, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, gs, gs, 1 - beta2)
    second = exp_avg_sqs
    if cfg.amsgrad:
        second = bufs["max_exp_avg_sq"]
        torch._foreach_maximum_(second, exp_avg_sqs)
    denom = torch._foreach_sqrt(second)
    if _util.host_readable(lr, *steps):
        ns = [s.item() for s in steps]
        bc1 = [1 - beta1**n for n in ns]
        if isinstance(lr, Tensor):  # one vectorised lr / bc, rounded as the per-tensor division
            step_size = torch.neg(lr / torch.tensor(bc1, dtype=lr.dtype))
        else:
            step_size = [(lr / bc) * -1 for bc in bc1]
        torch._foreach_div_(denom, [(1 - beta2**n) ** 0.5 for n in ns])
        torch._foreach_add_(denom, cfg.eps)
        torch._foreach_addcdiv_(thetas, exp_avgs, denom, step_size)
        return
    # neg_step_size = lr / (beta1^t - 1) = -lr / (1 - beta1^t); bc2_sqrt = sqrt(1 - beta2^t)
    neg_step_size = torch._foreach_pow(beta1, steps)
    torch._foreach_sub_(neg_step_size, 1)
    torch._foreach_div_(neg_step_size, lr)
    torch._foreach_reciprocal_(neg_step_size)
    bc2_sqrt = torch._foreach_pow(beta2, steps)
    torch._foreach_sub_(bc2_sqrt, 1)
    torch._foreach_neg_(bc2_sqrt)
    torch._foreach_sqrt_(bc2_sqrt)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, cfg.eps)
    torch._foreach_div_(denom, neg_step_size)
    torch._foreach_addcdiv_(thetas, exp_avgs, denom)


# Device types whose fused AdamW kernel (``torch._fused_adamw_``) is known to compute this rule.
_FUSED_DEVICES = ("cpu", "cuda")


def fused_eligible(
    thetas: list[Tensor],
    bufs: dict[str, list[Tensor]],
    steps: list[Tensor] | None,
    cfg: StepConfig,
    device: torch.device,
) -> bool:
    """Whether :func:`update_fused` computes this rule for the (device, dtype) group.

    ``torch._fused_adamw_`` keeps its state in the parameters' dtype and reads flat memory, so:
    fp32 parameters (fp16 / bf16 parameters have fp32 state here), every list fp32 and
    contiguous, fp32 0-d counters on the group's device, a float or fp32 0-d tensor lr, a device
    torch has the kernel for. Its CPU kernel reads the counters (and a tensor lr) on the host:
    no device sync, but not under tracing, nor where the host reads are switched off
    (``_util.HOST_READS``).
    """
    if device.type not in _FUSED_DEVICES or device.type not in _get_fused_kernels_supported_devices():
        return False
    if torch.compiler.is_compiling() or (device.type == "cpu" and not _util.HOST_READS):
        return False
    lr = cfg.lr
    if isinstance(lr, Tensor) and (lr.dtype != torch.float32 or lr.numel() != 1):
        return False
    if any(isinstance(x, Tensor) for x in (*cfg.betas, cfg.weight_decay, cfg.eps)):
        return False  # the kernel takes these as doubles: no host read of a tensor
    if steps is None or not all(s.dtype == torch.float32 and s.device == device and s.dim() == 0 for s in steps):
        return False
    lists = [thetas, *bufs.values()]
    return all(t.dtype == torch.float32 and t.device == device and t.is_contiguous() for ts in lists for t in ts)


def update_fused(
    thetas: list[Tensor],
    gs: list[Tensor],
    bufs: dict[str, list[Tensor]],
    steps: list[Tensor],
    cfg: StepConfig,
    *,
    found_inf: Tensor | None = None,
) -> None:
    """:func:`update_foreach` as one ``torch._fused_adamw_`` call, as torch.optim.adam._fused_adam
    makes it (``fused=True``): the counters are incremented first, the kernel reads them.

    Only for a group :func:`fused_eligible` accepts. ``gs`` is read, never written (no
    ``grad_scale`` is passed: the kernel would write the unscaled gradient back). ``found_inf``
    (a 0-d tensor, nonzero: skip): the kernel leaves parameters and moments untouched and the
    counters' increment is taken back, as torch does; no host read. Within rounding of
    :func:`update`: the kernel takes the bias corrections and ``lr * weight_decay`` in double
    and updates each element in one pass, in its own op order (bit-identical to torch's
    ``fused=True`` step, not to its foreach one).
    """
    if not thetas:
        return
    device = thetas[0].device
    beta1, beta2 = cfg.betas
    lr = cfg.lr
    if isinstance(lr, Tensor):
        lr = lr.reshape(()).to(device, non_blocking=True)  # as torch's _fused_adam moves it
    # The kernels skip only on found_inf == 1.0 (an fp32 tensor): any nonzero value means skip here.
    skip = None if found_inf is None else found_inf.reshape(()).to(device, non_blocking=True).ne(0).float()
    gs = [g if g.is_contiguous() else g.contiguous() for g in gs]
    torch._foreach_add_(steps, 1.0)
    torch._fused_adamw_(
        thetas,
        gs,
        bufs["exp_avg"],
        bufs["exp_avg_sq"],
        bufs["max_exp_avg_sq"] if cfg.amsgrad else [],
        steps,
        amsgrad=cfg.amsgrad,
        lr=lr,
        beta1=float(beta1),
        beta2=float(beta2),
        weight_decay=float(cfg.weight_decay),
        eps=float(cfg.eps),
        maximize=False,  # the prologue has already negated the gradient
        grad_scale=None,
        found_inf=skip,
    )
    if skip is not None:
        torch._foreach_sub_(steps, [skip] * len(steps))
