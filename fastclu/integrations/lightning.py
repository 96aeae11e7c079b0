"""Lightning integration: Flat-LoRA under ``lightning.pytorch.Trainer``.

fastclu's optimizers need nothing: return one from ``configure_optimizers`` and Lightning
drives it like a torch optimizer (closures, ``zero_grad``, schedulers, checkpoints).

:class:`FlatLoRACallback` trains :class:`fastclu.optim.FlatLoRA` with an otherwise unchanged
``LightningModule``. Lightning calls ``optimizer.step(closure)`` and runs forward and backward
inside that closure, so the step hooks of :meth:`FlatLoRA.attach` would fire at the wrong
moment (the pre-hook before the forward). The callback uses Lightning's own order instead:

* ``on_train_batch_start`` (before the batch's forward): open the step's noise, unless it is
  already open (gradient accumulation: every micro-batch of one step sees the same noise);
* ``on_before_optimizer_step`` (after the last backward, before the update and before gradient
  clipping): remove it, bit-exact by default;
* a step post-hook on the optimizer counts the step (``FlatLoRA.step()``), so a step skipped by
  AMP's scaler (``optimizer.step`` not called) does not advance the ramp, as with ``attach``;
* validation, the end of training and an exception close open noise: checkpoints and
  evaluation see the clean weights.

Needs ``lightning`` (``pip install lightning``; ``pytorch_lightning`` works too).
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package
    from pytorch_lightning.callbacks import Callback

from fastclu.optim import FlatLoRA

__all__ = ["FlatLoRACallback"]


class FlatLoRACallback(Callback):
    """Flat-LoRA noise around each optimizer step of a Lightning ``Trainer``.

    Args:
        flat: the :class:`fastclu.optim.FlatLoRA` of the module's LoRA layers (its ``t``, ramp
            and seed carry on across fits; the trainer must have exactly one optimizer).

    Example::

        flat = FlatLoRA(module.model, rho=0.05, total_steps=max_steps)
        Trainer(max_steps=max_steps, callbacks=[FlatLoRACallback(flat)]).fit(module, loader)
    """

    def __init__(self, flat: FlatLoRA) -> None:
        if not isinstance(flat, FlatLoRA):
            raise TypeError(f"flat must be a fastclu.optim.FlatLoRA, got {type(flat).__name__}")
        self.flat = flat
        self._hooks: list[Any] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(trainer.optimizers)
        if len(optimizers) != 1:
            raise ValueError(f"FlatLoRACallback needs exactly one optimizer, the trainer has {len(optimizers)}")
        self._remove_hooks()
        self._hooks.append(optimizers[0].register_step_post_hook(lambda *_: self.flat.step()))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.flat.is_open:
            self.flat.open()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.flat.close()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        # mid-accumulation validation: the next micro-batch reopens the same noise (same t, same A, B)
        self.flat.close()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.flat.close()
        self._remove_hooks()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.flat.close()
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
