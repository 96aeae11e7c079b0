"""Flat-LoRA (nblt/Flat-LoRA): random weight perturbation of the frozen base weight of LoRA layers.

At step ``t`` every LoRA layer's base weight ``W`` ``[out, in]`` is moved by row-scaled noise::

    W[r, :] += sigma_r * z[r, :],   sigma_r = f(t) * rho * ||(W + s*B@A)[r, :]|| / sqrt(in)
    f(t) = (1 - cos(pi * min(t + 1, T) / T)) / 2   (cosine ramp over T = total_steps; or 1)

before forward/backward, and put back before the update, so only ``A`` and ``B`` train (with
the gradient taken at the perturbed merged weight). The row norms are those of the merged
weight, computed without a dense ``W + s*B@A`` (:func:`fastclu.lora.merged_row_norms`). ``z`` is
the counter-based Philox normal of :func:`fastclu.ops.perturb_`, keyed on
``(mix_seed(seed, t), layer index, element index)``: regenerated bit-identically, the global
torch RNG (and so dropout) untouched. Removal is bit-exact by default (a backup of ``W`` in its
dtype, :func:`fastclu.ops.restore_`); ``exact=False`` subtracts the regenerated noise instead
(about an ulp of drift per cycle, see :class:`fastclu.optim.RandomPerturb`).

Differences from the official code: it builds a dense ``W + s*B@A``, a dense sigma and dense
noise per layer, re-seeds the global RNG, and adds / subtracts the noise in bf16 (not exact).

Works with any optimizer (fastclu's or torch's)::

    flat = FlatLoRA(model, rho=0.05, total_steps=T)
    flat.attach(opt)              # optional: removes open noise before, and counts, each opt.step()
    for x, y in data:
        with flat.perturbed():
            loss_fn(model(x), y).backward()
        opt.step(); opt.zero_grad()   # without attach(): call flat.step() after opt.step()
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from fastclu import ops
from fastclu.lora import LoRAPair, find_lora_layers, merged_row_norms
from fastclu.optim import _complex
from fastclu.perturb import mix_seed

__all__ = ["FlatLoRA"]


class FlatLoRA:
    """Flat-LoRA noise on the base weights of a model's LoRA layers (see the module docstring).

    Args:
        model: a module with LoRA layers (peft or :class:`fastclu.lora.LoRALinear`), or the
            list of :class:`fastclu.lora.LoRAPair` to perturb.
        rho: relative noise size (>= 0; Flat-LoRA's default 0.05).
        total_steps: ``T`` of the cosine ramp (int >= 1; needed for ``schedule="cosine"``).
        schedule: ``"cosine"`` or ``"constant"``.
        seed: 64-bit seed.
        exact: bit-exact removal from a backup (default) or subtract the regenerated noise.
        backend: ops backend (None: automatic).
    """

    def __init__(
        self,
        model: nn.Module | list[LoRAPair],
        rho: float = 0.05,
        total_steps: int | None = None,
        *,
        schedule: str = "cosine",
        seed: int = 0,
        exact: bool = True,
        backend: str | None = None,
    ) -> None:
        self.pairs = find_lora_layers(model) if isinstance(model, nn.Module) else list(model)
        if not self.pairs or not all(isinstance(p, LoRAPair) for p in self.pairs):
            raise TypeError("model must be an nn.Module with LoRA layers or a non-empty list of LoRAPair")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
            raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
        if schedule == "cosine" and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(f"schedule='cosine' needs total_steps, an int >= 1, got {total_steps!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        _complex.refuse(self.weights, "FlatLoRA", "row-scaled noise on a complex weight has no agreed meaning")
        devices = {p.weight.device for p in self.pairs}
        if len(devices) != 1:
            raise ValueError(f"the LoRA base weights must be on one device, found {sorted(map(str, devices))}")
        self.rho, self.total_steps, self.schedule = float(rho), total_steps, schedule
        self.seed, self.exact, self.backend = seed, bool(exact), backend
        self.t = 0
        self._open: tuple[float, int, list[Tensor]] | None = None
        self._backup: list[Tensor] | None = None
        self._hooks: list[Any] = []

    @property
    def weights(self) -> list[Tensor]:
        """The perturbed tensors: each layer's base weight ``[out, in]``."""
        return [p.weight for p in self.pairs]

    def ramp(self, t: int | None = None) -> float:
        """``f(t)`` (default: at the current step)."""
        t = self.t if t is None else t
        if self.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 - math.cos(math.pi * min(t + 1, self.total_steps) / self.total_steps))

    def step_seed(self, t: int | None = None) -> int:
        """The Philox key of step ``t``'s noise."""
        return mix_seed(self.seed, self.t if t is None else t)

    def sigmas(self) -> list[Tensor]:
        """fp32 ``sigma_r`` per row of each base weight at the current step and weights."""
        f = self.ramp() * self.rho
        return [f * n / math.sqrt(w.shape[1]) for n, w in zip(merged_row_norms(self.pairs), self.weights)]

    @property
    def is_open(self) -> bool:
        """Whether the base weights carry noise now."""
        return self._open is not None

    @torch.no_grad()
    def open(self) -> None:
        """Add this step's noise to the base weights (nothing when ``f(t) * rho == 0``)."""
        if self._open is not None:
            raise RuntimeError("FlatLoRA noise is already applied (call close() first)")
        scale = self.ramp() * self.rho
        ws = self.weights
        norms = merged_row_norms(self.pairs)
        backup = None
        if self.exact:
            if self._backup is None or any(b.shape != w.shape or b.dtype != w.dtype for b, w in zip(self._backup, ws)):
                self._backup = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in ws]
            backup = self._backup
        if scale != 0.0:
            ops.perturb_(ws, scale, backup=backup, seed=self.step_seed(), row_norms=norms, backend=self.backend)
        self._open = (scale, self.step_seed(), norms)

    @torch.no_grad()
    def close(self) -> None:
        """Remove the noise (bit-exact with ``exact=True``); no-op when none is applied."""
        if self._open is None:
            return
        (scale, seed, norms), self._open = self._open, None
        if scale == 0.0:
            return
        if self.exact:
            ops.restore_(self.weights, self._backup, backend=self.backend)
        else:
            ops.perturb_(self.weights, -scale, seed=seed, row_norms=norms, backend=self.backend)

    @contextmanager
    def perturbed(self) -> Iterator[None]:
        """Context: this step's noise inside, removed on exit (also when the body raises)."""
        self.open()
        try:
            yield
        finally:
            self.close()

    def step(self) -> None:
        """Count one optimizer step (the ramp and the noise key advance); closes open noise first."""
        self.close()
        self.t += 1

    def attach(self, optimizer: Optimizer, model: nn.Module | None = None) -> None:
        """Hook ``optimizer.step``: open noise is removed before each update and the step is counted after.

        With ``model``, also a forward pre-hook on it that opens the step's noise at the first
        forward in training mode (``model.training``) when none is open: a loop that never calls
        :meth:`open` (HF Trainer, Lightning) then trains Flat-LoRA with no other change; all
        forwards of one step (gradient accumulation) see the same noise, and eval-mode forwards
        none (the noise is closed by the preceding ``optimizer.step``).
        """
        target = optimizer
        # accelerate's AcceleratedOptimizer (HF Trainer) subclasses Optimizer without its hook
        # machinery and calls the inner optimizer's step: hook the inner one.
        while not hasattr(target, "_optimizer_step_pre_hooks") and hasattr(target, "optimizer"):
            target = target.optimizer
        if not hasattr(target, "_optimizer_step_pre_hooks"):
            raise TypeError(
                f"attach: {type(optimizer).__name__} supports no step hooks (nor wraps an optimizer that does)"
            )
        self._hooks.append(target.register_step_pre_hook(lambda *_: self.close()))
        self._hooks.append(target.register_step_post_hook(lambda *_: self.step()))
        if model is not None:

            def open_if_training(mod: nn.Module, _args: object) -> None:
                if mod.training and self._open is None:
                    self.open()

            self._hooks.append(model.register_forward_pre_hook(open_if_training))

    def hf_callback(self) -> Any:
        """A ``transformers.TrainerCallback`` that calls ``attach(optimizer, model)`` at train begin.

        ``Trainer(..., callbacks=[flat.hf_callback()])`` then trains Flat-LoRA unchanged
        otherwise (imports transformers only when called).
        """
        from transformers import TrainerCallback

        flat = self

        class FlatLoRACallback(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                flat.attach(kwargs["optimizer"], kwargs["model"])

            def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                flat.close()
                flat.detach()

        return FlatLoRACallback()

    def detach(self) -> None:
        """Remove the hooks of :meth:`attach`."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def state_dict(self) -> dict[str, Any]:
        """``{"t", "seed", "rho", "total_steps", "schedule"}`` (a checkpoint is taken with the noise removed)."""
        if self._open is not None:
            raise RuntimeError("close() the FlatLoRA noise before taking a state_dict")
        return {"t": self.t, "seed": self.seed, "rho": self.rho, "total_steps": self.total_steps,
                "schedule": self.schedule}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("t", "seed", "rho", "total_steps", "schedule"):
            if key not in state:
                raise KeyError(f"FlatLoRA state_dict is missing {key!r}")
        self.t, self.seed, self.rho = int(state["t"]), int(state["seed"]), float(state["rho"])
        self.total_steps, self.schedule = state["total_steps"], state["schedule"]
