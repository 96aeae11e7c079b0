"""Unlearning on causal language models: GA, GradDiff, NPO and SFR-on through fastclu's fused step.

Loss contract: ``loss_fn(model, batch) -> Tensor[B]`` (one loss per sequence); a batch is a dict
with ``input_ids`` (``int64[B, L]``) and optionally ``labels`` (``int64[B, L]``, ``-100`` ignored)
and ``attention_mask``. Without ``labels`` the targets are the ``input_ids`` (padding, where
``attention_mask == 0``, ignored). Labels are shifted inside, as HF causal LMs do.

Every method is written as *role gradients* combined in one fused optimizer step
(:meth:`fastclu.optim.SGD.step` / :meth:`fastclu.optim.AdamW.step` with ``combine=``):

===========  ==========================================================================
``ga``       ``forget``: mean sequence NLL on the forget batch; step ``{"forget": -w_f}``
``graddiff`` ``ga`` plus ``retain``, the retain NLL: ``{"forget": -w_f, "retain": w_r}``
``npo``      ``forget``: NPO loss (descended) plus the retain NLL: ``{"forget": w_f, "retain": w_r}``
``sfron``    SFR-on's official loop: every iteration a retain step; every ``K``-th a forget step
             before it: adaptively weighted NLL ascent, ``-alpha_f(t)``, saliency-masked and
             clipped (``{"forget": -alpha_f(t)}``, ``clip=``)
===========  ==========================================================================

:class:`RoleStepper` holds the per-micro-batch part (backward and stash) and the per-step
coefficients, so the plain loop :func:`unlearn_lm` and
:class:`fastclu.integrations.hf.UnlearningTrainer` run the same arithmetic.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastclu import ops
from fastclu.methods.common import MethodResult, Timer, cosine, cycle

__all__ = [
    "METHODS",
    "LMUnlearnConfig",
    "RoleStepper",
    "adaptive_weighted",
    "check_lm_batch",
    "lm_fisher",
    "lm_saliency_mask",
    "npo_loss",
    "reference_for",
    "sequence_logprob",
    "sequence_nll",
    "unlearn_lm",
]

METHODS = ("ga", "graddiff", "npo", "sfron")
IGNORE = -100


def check_lm_batch(name: str, batch: object) -> None:
    """Raise a clear error unless ``batch`` is a dict with an int ``input_ids`` tensor (and valid labels)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"{name} must yield dict batches with 'input_ids' (HF style), got {type(batch).__name__}")
    ids = batch.get("input_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise ValueError(f"{name}: every batch needs 'input_ids', an integer tensor [batch, length]")
    labels = batch.get("labels")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != ids.shape):
        raise ValueError(f"{name}: 'labels' must be a tensor shaped like 'input_ids' {tuple(ids.shape)}")


def _targets(batch: Mapping[str, Tensor]) -> Tensor:
    labels = batch.get("labels")
    if labels is not None:
        return labels
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return ids if mask is None else ids.masked_fill(mask == 0, IGNORE)


def _model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}


def _token_nll(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per-token NLL ``float32[B, L-1]`` (0 where ignored) and the kept-token mask."""
    logits = model(**_model_inputs(batch)).logits[:, :-1]
    target = _targets(batch)[:, 1:].to(logits.device)
    keep = target != IGNORE
    nll = F.cross_entropy(logits.float().transpose(1, 2), target.masked_fill(~keep, 0), reduction="none")
    return nll * keep, keep


def sequence_nll(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Mean token NLL per sequence, ``float32[B]`` (nats/token over the non-ignored shifted labels).

    A sequence without any target token gets 0.
    """
    nll, keep = _token_nll(model, batch)
    return nll.sum(1) / keep.sum(1).clamp_min(1)


def sequence_logprob(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """``log pi(y|x)`` per sequence: the sum of the target tokens' log-probabilities, ``float32[B]``."""
    nll, _ = _token_nll(model, batch)
    return -nll.sum(1)


def npo_loss(logp: Tensor, ref_logp: Tensor, beta: float = 0.1) -> Tensor:
    """NPO: ``-(2/beta) * mean(log sigmoid(-beta * (logp - ref_logp)))`` (scalar; descended).

    Args:
        logp: ``float32[B]`` sequence log-probabilities under the model (with grad).
        ref_logp: ``float32[B]`` the same under the frozen reference (no grad).
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp.detach())).mean()


def adaptive_weighted(losses: Tensor, lam: float) -> Tensor:
    """SFR-on's ``sum_i w_i l_i`` with ``w_i = c_i / sum c``, ``c_i = 1 / (stopgrad(l_i)^lam + 1e-15)``."""
    c = 1.0 / (losses.detach().clamp_min(0.0) ** lam + 1e-15)
    return (c / c.sum() * losses).sum()


def reference_for(model: nn.Module, ref_model: nn.Module | None = None) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """NPO's frozen reference as a function of a batch.

    Returns a callable ``ref(batch) -> float32[B]`` reference sequence log-probabilities:
    with a peft model and no ``ref_model``, the model itself under ``model.disable_adapter()``
    (no second copy); else ``ref_model`` (checked to be the same architecture), or a frozen
    deep copy of ``model`` taken now.
    """
    if ref_model is None and hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):

        def peft_ref(batch: Mapping[str, Tensor]) -> Tensor:
            with torch.no_grad(), model.disable_adapter():
                return sequence_logprob(model, batch)

        return peft_ref
    if ref_model is None:
        ref_model = copy.deepcopy(model)
    else:
        check_reference(model, ref_model)
    ref_model.eval()
    ref_model.requires_grad_(False)

    def frozen_ref(batch: Mapping[str, Tensor]) -> Tensor:
        with torch.no_grad():
            return sequence_logprob(ref_model, batch)

    return frozen_ref


def check_reference(model: nn.Module, ref_model: nn.Module) -> None:
    """Raise ``ValueError`` naming ``ref_model`` unless it has the model's architecture (parameter names and shapes)."""
    if not isinstance(ref_model, nn.Module):
        raise TypeError(f"ref_model must be a torch.nn.Module, got {type(ref_model).__name__}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # peft keeps the wrapped weight as "<name>.base_layer.weight" next to its "lora_*" tensors.
    want = {k.replace(".base_layer", ""): tuple(v.shape) for k, v in base.state_dict().items() if "lora_" not in k}
    got = {k: tuple(v.shape) for k, v in ref_model.state_dict().items()}
    if type(ref_model) is not type(base) or want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise ValueError(
            f"ref_model must have the model's architecture ({type(base).__name__}, same parameter names and "
            f"shapes); got {type(ref_model).__name__}, first differences: {diff}"
        )


def trainable_params(opt: torch.optim.Optimizer) -> list[Tensor]:
    """The optimizer's parameters in param-group order (what masks and Fishers align with)."""
    inner = getattr(opt, "optimizer", opt)
    while not hasattr(inner, "stash") and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return [p for g in inner.param_groups for p in g["params"]]


def lm_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    params: Sequence[Tensor],
    loss_fn: Callable[[nn.Module, Mapping[str, Tensor]], Tensor] = sequence_nll,
) -> list[Tensor]:
    """Diagonal Fisher of ``params``: mean over batches of ``(d mean(loss_fn) / d p)**2``, fp32, one per param.

    ``.grad`` is not touched; the model's train/eval mode is left as the caller set it.
    """
    params = list(params)
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    n = 0
    for batch in batches:
        with torch.enable_grad():
            loss = loss_fn(model, batch).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        pairs = [(a, g.float().contiguous()) for a, g in zip(acc, grads) if g is not None]
        if pairs:
            ops.fisher_accumulate_([a for a, _ in pairs], [g for _, g in pairs], 1.0)
        n += 1
    if n == 0:
        raise ValueError("lm_fisher: no batches")
    for a in acc:
        a.div_(n)
    return acc


def lm_saliency_mask(
    model: nn.Module,
    forget_batches: Iterable[Mapping[str, Tensor]],
    retain_batches: Iterable[Mapping[str, Tensor]],
    params: Sequence[Tensor],
    gamma: float = 1.0,
):
    """SFR-on's balanced mask ``[F_forget + eps >= gamma * (F_retain + eps)]`` over ``params`` (trainable only).

    Returns a :class:`fastclu.saliency.SaliencyMask` aligned with ``params``.
    """
    from fastclu.saliency import ratio_mask

    was = model.training
    model.eval()
    try:
        f_f = lm_fisher(model, forget_batches, params)
        f_r = lm_fisher(model, retain_batches, params)
    finally:
        model.train(was)
    return ratio_mask(f_f, f_r, gamma=gamma, eps=1e-15)


@dataclass
class LMUnlearnConfig:
    """Hyper-parameters of the LLM unlearning methods (see the module docstring).

    Attributes:
        method: one of :data:`METHODS`.
        forget_weight: ``w_f``, coefficient of the forget role (ga / graddiff / npo).
        retain_weight: ``w_r``, coefficient of the retain role (graddiff / npo).
        beta: NPO temperature (paper default 0.1).
        alpha_f: SFR-on forget weight at t = 0, cosine-decayed to 0 over ``total_steps``.
        forget_every: SFR-on's ``K``.
        lam: SFR-on adaptive-weight temperature (0.5 official).
        gamma: SFR-on mask threshold (None: no mask).
        mask_mode: ``"grad"`` (official) or ``"update"``.
        clip: global-norm bound of the combined masked gradient (None: none). For ``sfron`` only
            the forget step is clipped (official); for the others the whole combined step.
    """

    method: str = "graddiff"
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    beta: float = 0.1
    alpha_f: float = 1.0
    forget_every: int = 5
    lam: float = 0.5
    gamma: float | None = 1.0
    mask_mode: str = "grad"
    clip: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if isinstance(self.forget_every, bool) or not isinstance(self.forget_every, int) or self.forget_every < 1:
            raise ValueError(f"forget_every must be an int >= 1, got {self.forget_every!r}")
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ValueError(f"beta must be > 0, got {self.beta!r}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip must be > 0 or None, got {self.clip!r}")
        if self.mask_mode not in ("grad", "update"):
            raise ValueError(f"mask_mode must be 'grad' or 'update', got {self.mask_mode!r}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam!r}")


class RoleStepper:
    """The arithmetic of one unlearning iteration, split so a Trainer can run it per micro-batch.

    ``opt`` must be a fastclu SGD / AdamW (or a wrapper around one): ``stash``/``step(combine=)``.
    ``ref`` is the NPO reference from :func:`reference_for`. Losses are scaled by ``scale``
    (``1 / gradient_accumulation_steps``) before backward, so accumulated roles equal the
    full-batch gradients.
    """

    def __init__(self, config: LMUnlearnConfig, opt: Any, ref: Callable[[Mapping[str, Tensor]], Tensor] | None = None):
        if config.method == "npo" and ref is None:
            raise ValueError("method 'npo' needs a reference (see reference_for)")
        self.config = config
        self.opt = opt
        self.ref = ref

    def is_forget_iteration(self, t: int) -> bool:
        """SFR-on: whether iteration ``t`` starts with a forget step (``t % K == 0``); always True otherwise."""
        return self.config.method != "sfron" or t % self.config.forget_every == 0

    def forget_backward(
        self, model: nn.Module, batch: Mapping[str, Tensor], scale: float = 1.0, autocast: Any = nullcontext
    ) -> Tensor:
        """Backward of the forget role on one micro-batch, stashed under ``"forget"``; returns the loss (detached)."""
        m = self.config.method
        with autocast():
            if m == "npo":
                loss = npo_loss(sequence_logprob(model, batch), self.ref(batch), self.config.beta)
            elif m == "sfron":
                loss = adaptive_weighted(sequence_nll(model, batch), self.config.lam)
            else:
                loss = sequence_nll(model, batch).mean()
        (loss * scale).backward()
        self.opt.stash("forget")
        return loss.detach()

    def retain_backward(
        self, model: nn.Module, batch: Mapping[str, Tensor], scale: float = 1.0, autocast: Any = nullcontext
    ) -> Tensor:
        """Backward of the retain NLL on one micro-batch; returns the loss (detached).

        Stashed under ``"retain"`` (so the next micro-batch's forget backward does not add into
        it), except for ``sfron``, whose retain step is a plain step on ``.grad``.
        """
        with autocast():
            loss = sequence_nll(model, batch).mean()
        (loss * scale).backward()
        if self.config.method != "sfron":
            self.opt.stash("retain")
        return loss.detach()

    def uses_retain(self) -> bool:
        """Whether ordinary (non-forget-step) iterations need a retain batch (all but ``ga``)."""
        return self.config.method != "ga"

    def forget_step(self, t: int, total: int) -> None:
        """SFR-on's forget step: ascend the stashed forget role, masked and clipped."""
        c = self.config
        self.opt.step(combine={"forget": -c.alpha_f * cosine(t, total)}, clip=c.clip)
        self.opt.zero_grad(set_to_none=True)

    def combine(self) -> tuple[dict[str, float], float | None]:
        """``(combine, clip)`` of the main step of an iteration (after its backwards)."""
        c = self.config
        if c.method == "ga":
            return {"forget": -c.forget_weight}, c.clip
        if c.method == "graddiff":
            return {"forget": -c.forget_weight, "retain": c.retain_weight}, c.clip
        if c.method == "npo":
            return {"forget": c.forget_weight, "retain": c.retain_weight}, c.clip
        return {"grad": 1.0}, None  # sfron's retain step: plain, unclipped (official)


def unlearn_lm(
    model: nn.Module,
    forget_loader: Iterable[Mapping[str, Tensor]],
    retain_loader: Iterable[Mapping[str, Tensor]],
    config: LMUnlearnConfig,
    opt: torch.optim.Optimizer,
    steps: int,
    *,
    ref_model: nn.Module | None = None,
    mask_batches: int = 8,
    scheduler: Any = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> MethodResult:
    """Unlearn ``forget_loader`` from a causal LM in place with ``config.method`` for ``steps`` iterations.

    Args:
        model: an HF causal LM (``model(input_ids=...).logits``), peft-wrapped or not.
        forget_loader, retain_loader: loaders of dict batches (see the module docstring); cycled.
        config: :class:`LMUnlearnConfig`.
        opt: a fastclu SGD / AdamW over the parameters to train (frozen ones left out).
        steps: iterations T (SFR-on: T retain steps and ceil(T / K) forget steps).
        ref_model: NPO's frozen reference (default: adapter-disabled base for peft, else a copy).
        mask_batches: forget / retain batches for SFR-on's Fishers.
        scheduler: optional LR scheduler, stepped once per iteration.
        callback: called as ``callback(t, {"forget_loss": ..., "retain_loss": ...})`` every iteration.
    Returns:
        MethodResult with wall time (mask and reference set-up included); ``info`` has the mask
        density (sfron) and the forget / retain step counts.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not hasattr(opt, "stash"):
        raise TypeError(f"opt must be a fastclu optimizer (stash/combine), got {type(opt).__name__}")
    dev = next(model.parameters()).device
    info: dict[str, Any] = {}
    with Timer(dev) as tm:
        ref = reference_for(model, ref_model) if config.method == "npo" else None
        stepper = RoleStepper(config, opt, ref)
        fit, rit = cycle(forget_loader), cycle(retain_loader)
        if config.method == "sfron" and config.gamma is not None:
            params = trainable_params(opt)
            mask = lm_saliency_mask(
                model,
                _take(forget_loader, mask_batches, dev),
                _take(retain_loader, mask_batches, dev),
                params,
                config.gamma,
            )
            opt.set_mask(mask, mode=config.mask_mode, roles=["forget"])
            info["mask_density"] = float(mask.density())
        model.train()
        n_forget = n_retain = 0
        for t in range(steps):
            losses: dict[str, float] = {}
            opt.zero_grad(set_to_none=True)
            if config.method == "sfron":
                if stepper.is_forget_iteration(t):
                    losses["forget_loss"] = float(stepper.forget_backward(model, _on(next(fit), dev)))
                    stepper.forget_step(t, steps)
                    n_forget += 1
            else:
                losses["forget_loss"] = float(stepper.forget_backward(model, _on(next(fit), dev)))
                n_forget += 1
            if stepper.uses_retain():
                losses["retain_loss"] = float(stepper.retain_backward(model, _on(next(rit), dev)))
                n_retain += 1
            combine, clip = stepper.combine()
            opt.step(combine=combine, clip=clip)
            if scheduler is not None:
                scheduler.step()
            if callback is not None:
                callback(t, losses)
        opt.zero_grad(set_to_none=True)
    info.update(forget_steps=n_forget, retain_batches=n_retain)
    return MethodResult(config.method, tm.elapsed, steps, info)


def _take(loader: Iterable, n: int, dev: torch.device) -> list:
    out = []
    for batch in loader:
        out.append(_on(batch, dev))
        if len(out) >= n:
            break
    return out


def _on(batch: Mapping[str, Tensor], dev: torch.device) -> dict[str, Tensor]:
    check_lm_batch("batch", batch)
    return {k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in batch.items()}
