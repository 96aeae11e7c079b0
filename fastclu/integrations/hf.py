"""Hugging Face ``Trainer`` integration: LLM unlearning through fastclu's fused step, perturbation windows.

* :class:`UnlearningTrainer`: a ``transformers.Trainer`` that unlearns a forget set with one of
  :data:`fastclu.methods.llm.METHODS` (``ga``, ``graddiff``, ``npo``, ``sfron``). The role
  gradients are stashed per micro-batch and combined (with SFR-on's mask and clip) in one fused
  step of a fastclu optimizer, reached through accelerate's ``AcceleratedOptimizer``.
* :class:`PerturbationCallback`: opens a :class:`fastclu.optim.RandomPerturb` /
  :class:`fastclu.optim.PerturbMerge` window at ``on_step_begin`` (before the first micro-batch's
  forward) and closes it at ``on_pre_optimizer_step`` (after the last backward), so a plain
  ``Trainer`` — which passes no closure to ``step()`` — trains at the perturbed weights.
  Without it (and without a closure) those wrappers raise in ``step()``.

Needs ``transformers`` (``pip install fastclu[hf]``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from fastclu.methods.llm import (
    METHODS,
    LMUnlearnConfig,
    RoleStepper,
    check_reference,
    lm_saliency_mask,
    reference_for,
)
from fastclu.optim import AdamW, OptimizerWrapper, PerturbMerge, RandomPerturb

__all__ = ["PerturbationCallback", "RoleStep", "SideBatches", "UnlearningTrainer"]


class SideBatches:
    """Batches of a second dataset indexed by a counter, so a resumed run draws the same ones.

    Batch ``k`` holds examples ``perm_e[j*b : (j+1)*b]`` with ``e, j = divmod(k, n // b)``,
    ``b = batch_size`` and ``perm_e = torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))``
    (a reshuffle per pass; a last incomplete batch is dropped).
    """

    def __init__(self, dataset: Sequence, batch_size: int, collate: Callable[[list], Any], seed: int) -> None:
        n = len(dataset)
        if n < batch_size:
            raise ValueError(f"dataset has {n} examples, fewer than one batch of {batch_size}")
        self.dataset, self.batch_size, self.collate, self.seed = dataset, batch_size, collate, seed
        self.per_pass = n // batch_size
        self._perm: tuple[int, Tensor] | None = None

    def indices(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_pass)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(len(self.dataset), generator=g))
        return self._perm[1][j * self.batch_size : (j + 1) * self.batch_size].tolist()

    def batch(self, k: int) -> Any:
        return self.collate([self.dataset[i] for i in self.indices(k)])


class RoleStep(OptimizerWrapper):
    """What ``Trainer`` steps: the wrapped fastclu optimizer's fused step with the method's roles.

    ``step()`` (no closure: Trainer passes none) calls ``inner.step(combine=..., clip=...)`` with
    the coefficients of :meth:`fastclu.methods.llm.RoleStepper.combine`. Everything else (state,
    param groups, ``stash``, ``set_mask``) is the inner optimizer's, so the checkpoint Trainer
    writes holds the moments, the mask and any stash.
    """

    _state_key = "unlearning_roles"

    def __init__(self, optimizer: torch.optim.Optimizer, stepper: RoleStepper) -> None:
        super().__init__(optimizer)
        self.stepper = stepper

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        if closure is not None:
            raise ValueError("RoleStep.step() takes no closure: the trainer runs the role backwards itself")
        combine, clip = self.stepper.combine()
        return self.optimizer.step(combine=combine, clip=clip, **kwargs)

    def _wrapper_state(self, index: dict[Tensor, int]) -> dict[str, Any]:
        return {"method": self.stepper.config.method}

    def _parse_wrapper_state(self, saved: dict[str, Any], params: list[Tensor]) -> Callable[[], None]:
        if not isinstance(saved, dict) or saved.get("method") != self.stepper.config.method:
            raise ValueError(
                f"the checkpoint's optimizer was saved by method {saved.get('method')!r}, "
                f"this trainer runs {self.stepper.config.method!r}"
            )
        return lambda: None


def _fastclu_inner(opt: Any) -> Any:
    """The fastclu optimizer under accelerate / fastclu wrappers (the object with ``stash``)."""
    seen = opt
    while seen is not None and not hasattr(type(seen), "stash"):
        seen = getattr(seen, "optimizer", None)
    return seen


def _check_batch_keys(name: str, batch: object) -> None:
    keys = sorted(batch.keys()) if isinstance(batch, Mapping) else type(batch).__name__
    if not isinstance(batch, Mapping) or not {"input_ids", "labels"} <= batch.keys():
        raise ValueError(
            f"{name}: batches must be dicts with 'input_ids' and 'labels' (labels -100 where ignored), got {keys}; "
            "add labels to the examples or use DataCollatorForLanguageModeling(tokenizer, mlm=False)"
        )
    ids, labels = batch["input_ids"], batch["labels"]
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise ValueError(f"{name}: 'input_ids' must collate to an integer tensor [batch, length]")
    if not isinstance(labels, Tensor) or labels.shape != ids.shape:
        raise ValueError(f"{name}: 'labels' must collate to a tensor shaped like 'input_ids' {tuple(ids.shape)}")


class UnlearningTrainer(Trainer):
    """A ``transformers.Trainer`` that unlearns ``forget_dataset`` from a causal LM with fastclu.

    One Trainer optimizer step is one unlearning iteration (``max_steps`` of them):

    * ``ga`` / ``graddiff`` / ``npo``: the Trainer's train dataset is the forget set; for every
      micro-batch the forget role (and, except ``ga``, the retain role on a retain batch drawn by
      :class:`SideBatches`) is back-propagated, scaled by ``1 / gradient_accumulation_steps`` and
      stashed; the optimizer step combines them (:meth:`fastclu.methods.llm.RoleStepper.combine`).
    * ``sfron``: the train dataset is the retain set (a remain step every iteration, official);
      every ``forget_every``-th iteration starts, at its first micro-batch, with the forget step
      (``gradient_accumulation_steps`` forget batches, adaptively weighted NLL ascended with
      ``alpha_f`` cosine-decayed over ``max_steps``, masked by the forget/retain Fisher ratio over
      the optimizer's parameters, clipped), then the retain micro-batches follow at the updated
      weights. The mask is computed when the optimizer is created (``mask_batches`` batches each).

    The optimizer is fastclu's AdamW built from the ``TrainingArguments`` (Trainer's own
    decay/no-decay groups over trainable parameters), or any fastclu optimizer passed in
    ``optimizers=``. Trainer's ``max_grad_norm`` clipping of ``.grad`` would see only part of the
    roles, so it is turned off and its value becomes ``config.clip`` (the fused clip of the
    combined gradient; for ``sfron`` of the forget step only) unless ``clip`` is given.

    Args:
        model: a causal LM (HF, or a peft model around one).
        args: ``TrainingArguments`` (fp16 is refused: GradScaler only unscales ``.grad``; use bf16).
        forget_dataset, retain_dataset: map-style datasets of examples that collate (with
            ``data_collator``) to dicts with ``input_ids`` and ``labels``. ``retain_dataset`` is
            needed by every method but ``ga``.
        method: one of ``"ga"``, ``"graddiff"``, ``"npo"``, ``"sfron"``.
        ref_model: NPO's frozen reference (same architecture; default: the adapter-disabled base
            for a peft model, else a frozen copy of ``model`` taken at construction).
        config: method hyper-parameters (``method`` and ``clip`` in it are overridden by the
            arguments of the same name); default ``LMUnlearnConfig()``.
        clip: see above.
        mask_batches: batches per Fisher for ``sfron``'s mask.
        side_seed: seed of :class:`SideBatches` (default ``args.seed``).
        **kwargs: passed to ``Trainer`` (``train_dataset`` is set by this class).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        *,
        forget_dataset: Any = None,
        retain_dataset: Any = None,
        method: str = "graddiff",
        ref_model: nn.Module | None = None,
        config: LMUnlearnConfig | None = None,
        clip: float | None = None,
        mask_batches: int = 8,
        side_seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        if "train_dataset" in kwargs:
            raise TypeError("UnlearningTrainer takes forget_dataset / retain_dataset, not train_dataset")
        if forget_dataset is None or not hasattr(forget_dataset, "__len__") or len(forget_dataset) == 0:
            raise ValueError("forget_dataset must be a non-empty map-style dataset")
        if method != "ga" and (retain_dataset is None or not hasattr(retain_dataset, "__len__")
                               or len(retain_dataset) == 0):  # fmt: skip
            raise ValueError(f"method {method!r} needs a non-empty map-style retain_dataset")
        if isinstance(mask_batches, bool) or not isinstance(mask_batches, int) or mask_batches < 1:
            raise ValueError(f"mask_batches must be an int >= 1, got {mask_batches!r}")
        if ref_model is not None:
            if method != "npo":
                raise ValueError(f"ref_model is only used by method 'npo', not {method!r}")
            if model is None:
                raise ValueError("model must be given")
            check_reference(model, ref_model)
        if args is not None and getattr(args, "fp16", False):
            raise ValueError("args.fp16 is not supported (GradScaler unscales only .grad, not stashed roles); use bf16")
        if args is not None:
            args = copy.copy(args)
            if clip is None and args.max_grad_norm and args.max_grad_norm > 0:
                clip = float(args.max_grad_norm)
            args.max_grad_norm = 0.0
        base = config if config is not None else LMUnlearnConfig()
        self.unlearn_config = LMUnlearnConfig(**{**vars(base), "method": method, "clip": clip})
        self.forget_dataset, self.retain_dataset = forget_dataset, retain_dataset
        self.mask_batches = mask_batches
        self._ref_model = ref_model
        driver = retain_dataset if method == "sfron" else forget_dataset
        super().__init__(model=model, args=args, train_dataset=driver, **kwargs)
        # Checked on collated batches: what the losses will see.
        n = min(self.args.per_device_train_batch_size, len(forget_dataset))
        _check_batch_keys("forget_dataset", self.data_collator([forget_dataset[i] for i in range(n)]))
        if retain_dataset is not None:
            n = min(self.args.per_device_train_batch_size, len(retain_dataset))
            _check_batch_keys("retain_dataset", self.data_collator([retain_dataset[i] for i in range(n)]))
        seed = self.args.seed if side_seed is None else side_seed
        side = forget_dataset if method == "sfron" else retain_dataset
        self.side_batches = (
            SideBatches(side, self.args.per_device_train_batch_size, self.data_collator, seed)
            if side is not None
            else None
        )
        ref = None
        if method == "npo":
            if ref_model is not None:
                ref_model.to(self.args.device)
            ref = reference_for(self.model, ref_model)
        self.stepper = RoleStepper(self.unlearn_config, None, ref)
        self._micro = 0
        self.last_losses: dict[str, float] = {}

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            a = self.args
            self.optimizer_cls_and_kwargs = (
                AdamW,
                {"lr": a.learning_rate, "betas": (a.adam_beta1, a.adam_beta2), "eps": a.adam_epsilon},
            )
        if not isinstance(self.optimizer, RoleStep):
            super().create_optimizer(model)
            inner = _fastclu_inner(self.optimizer)
            if inner is None:
                raise TypeError(
                    "optimizers / optimizer_cls_and_kwargs must give a fastclu optimizer (fastclu.optim.SGD / "
                    f"AdamW, or a wrapper around one), got {type(self.optimizer).__name__}"
                )
            self.stepper.opt = inner
            self.optimizer = RoleStep(self.optimizer, self.stepper)
            if self.unlearn_config.method == "sfron" and self.unlearn_config.gamma is not None:
                self._install_mask(inner)
        return self.optimizer

    def _install_mask(self, inner: Any) -> None:
        params = [p for g in inner.param_groups for p in g["params"]]
        side = self.side_batches
        forget = [self._prepare_inputs(side.batch(k)) for k in range(self.mask_batches)]
        drv = SideBatches(self.retain_dataset, self.args.per_device_train_batch_size, self.data_collator,
                          side.seed + 10_007)  # fmt: skip
        retain = [self._prepare_inputs(drv.batch(k)) for k in range(self.mask_batches)]
        mask = lm_saliency_mask(self.model, forget, retain, params, self.unlearn_config.gamma)
        inner.set_mask(mask, mode=self.unlearn_config.mask_mode, roles=["forget"])
        self.mask_density = float(mask.density())

    # ------------------------------------------------------------------ step
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        _check_batch_keys("train batch", inputs)
        scale = 1.0 / self.current_gradient_accumulation_steps
        acc = self.args.gradient_accumulation_steps
        t, micro, st = self.state.global_step, self._micro, self.stepper
        amp = self.compute_loss_context_manager
        if self.unlearn_config.method == "sfron":
            if micro == 0 and st.is_forget_iteration(t):
                n_forget = t // self.unlearn_config.forget_every
                side = self.side_batches
                fl = []
                for j in range(acc):
                    batch = self._prepare_inputs(side.batch(n_forget * acc + j))
                    fl.append(st.forget_backward(model, batch, scale=1.0 / acc, autocast=amp))
                st.forget_step(t, self.state.max_steps)
                self.last_losses["forget_loss"] = float(torch.stack(fl).mean())
            loss = st.retain_backward(model, inputs, scale, autocast=amp)
            self.last_losses["retain_loss"] = float(loss)
        else:
            loss = st.forget_backward(model, inputs, scale, autocast=amp)
            self.last_losses["forget_loss"] = float(loss)
            if st.uses_retain():
                batch = self._prepare_inputs(self.side_batches.batch(t * acc + micro))
                self.last_losses["retain_loss"] = float(st.retain_backward(model, batch, scale, autocast=amp))
        self._micro = 0 if self.accelerator.sync_gradients else micro + 1
        return (loss * scale).detach()


class PerturbationCallback(TrainerCallback):
    """Opens a perturbation window at ``on_step_begin``, closes it at ``on_pre_optimizer_step``.

    So every forward and backward of the optimizer step (all gradient-accumulation micro-batches)
    runs at the perturbed weights, and the step itself sees the clean ones:

    * :class:`fastclu.optim.RandomPerturb`: ``apply_noise()`` / ``remove_noise()`` (this step's
      noise; the schedule advances with each ``step()``).
    * :class:`fastclu.optim.PerturbMerge`: its ``perturbed()`` context (one draw of ``k`` per
      optimizer step). With ``accumulate_fisher=True`` the step's gradient also enters the
      task's Fisher (``accumulate_fisher()``) before the window closes.

    Args:
        wrapper: the RandomPerturb / PerturbMerge the Trainer's optimizer is (or wraps).
        accumulate_fisher: PerturbMerge only, see above.
    """

    def __init__(self, wrapper: RandomPerturb | PerturbMerge, *, accumulate_fisher: bool = False) -> None:
        if not isinstance(wrapper, (RandomPerturb, PerturbMerge)):
            raise TypeError(f"wrapper must be a RandomPerturb or PerturbMerge, got {type(wrapper).__name__}")
        if accumulate_fisher and not isinstance(wrapper, PerturbMerge):
            raise ValueError("accumulate_fisher=True needs a PerturbMerge wrapper")
        self.wrapper = wrapper
        self.accumulate_fisher = accumulate_fisher
        self._window: ExitStack | None = None
        self.windows = 0

    def _close(self) -> None:
        if self._window is not None:
            window, self._window = self._window, None
            window.close()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()
        window = ExitStack()
        if isinstance(self.wrapper, RandomPerturb):
            self.wrapper.apply_noise()
            window.callback(self.wrapper.remove_noise)
        else:
            window.enter_context(self.wrapper.perturbed())
        self._window = window
        self.windows += 1

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.accumulate_fisher:
            self.wrapper.accumulate_fisher()
        self._close()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()
