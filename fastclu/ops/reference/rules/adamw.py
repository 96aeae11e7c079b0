"""AdamW (decoupled weight decay, optional AMSGrad) in torch.optim.adam's single-tensor op order."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu.ops.rules import StepConfig


def update(theta: Tensor, g: Tensor, bufs: dict[str, Tensor], step: Tensor | None, cfg: StepConfig) -> None:
    """In place on ``theta``, the moment buffers and the 0-d ``step`` counter.

    Bias corrections in Python floats, a tensor lr kept a tensor, as torch does.
    """
    assert step is not None
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
