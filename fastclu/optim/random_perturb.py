"""Random weight perturbation (Flat-LoRA style) around any optimizer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastclu._scalars import check_scalar
from fastclu.optim import _complex
from fastclu.optim._wrapper import OptimizerWrapper, _int, kept_backup
from fastclu.perturb import mix_seed, perturb_many_, restore_many_, restore_or_pend_

__all__ = ["RandomPerturb"]

SCHEDULES = ("cosine", "constant")


def _scratch(params: list[Tensor]) -> list[Tensor]:
    return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]


def _check_rho(name: str, rho: object) -> float:
    return float(check_scalar(name, rho, lo=0.0, tensor_ok=False))


class RandomPerturb(OptimizerWrapper):
    """Row-scaled Gaussian weight noise before forward/backward, removed before the update.

    At optimizer step ``t`` (the number of completed :meth:`step` calls) every parameter of a
    group with ``rho > 0`` is moved by ``sigma_row * z`` with::

        sigma_row = f(t) * rho * ||W_row|| / sqrt(n)          (row = index of dim 0, n = row length;
                                                               a tensor of ndim <= 1 is one row)
        f(t) = (1 - cos(pi * min(t + 1, T) / T)) / 2           schedule="cosine", T = total_steps
        f(t) = 1                                               schedule="constant"

    so the noise ramps up from ``f(0) ~ (pi / 2T)**2`` at the first step to its full size at step
    ``T - 1`` and stays there. ``z`` is the counter-based Philox normal of
    :func:`fastclu.ops.perturb_`, keyed on a per-step seed ``mix(seed, t, group index)``: it is
    regenerated bit-identically from the seed and the step counter, and the global torch RNG
    is never touched. ``rho`` is per param group (``group["rho"]``, default the ``rho``
    argument; 0 leaves a group unperturbed), so e.g. biases and norms can be excluded.

    Use it as a context, or call :meth:`apply_noise` and let :meth:`step` remove it::

        with opt.perturbed():
            loss = loss_fn(model(x), y); loss.backward()
        opt.step()

    Removal:
      * ``exact=True`` (default): the clean weights are kept (one copy in the parameters'
        dtype) and put back bit for bit.
      * ``exact=False`` (memory saving): only the fp32 row norms are kept; the same noise is
        regenerated and subtracted (``perturb_`` with ``-scale``). Each cycle then leaves a
        rounding residue: ``theta + s*d`` is rounded to the weights' dtype, and so is the
        subtraction; one cycle moves an element by at most one ulp of ``max(|theta|, |theta + s*d|)``
        (tested). Measured drift after N apply/remove cycles (rho = 0.05, constant schedule, a
        32x64 N(0, 1) weight, a new seed per cycle; ulp = ulp of the row's RMS weight;
        ``tests/optim/test_random_perturb.py::test_memory_saving_drift_1000``, marked slow):

        =====  ======  ==================  ==================  =================  ===============
        dtype  N       max |drift| (ulp)   RMS drift (ulp)     ||drift||/||w||    elements moved
        =====  ======  ==================  ==================  =================  ===============
        fp32   1       2                   0.12                1.0e-8             7%
        fp32   1000    30                  2.5                 2.2e-7             67%
        bf16   1       2                   0.08                4.4e-4             5%
        bf16   1000    30                  2.4                 1.3e-2             38%
        =====  ======  ==================  ==================  =================  ===============

        i.e. at most about an ulp per cycle, accumulating like a random walk (RMS ~ sqrt(N) / 12
        ulp): harmless in fp32, about 1% of the weights' norm in bf16 after 1000 cycles (use
        ``exact=True`` there, or fp32 master weights).

        Each move (the noise in, the noise out) is still a transaction: a transient copy of the
        group's weights is taken for the length of the move only (freed before the forward), so an
        interrupt between two tensors puts the group back as it was before that move.

    Args:
        optimizer: any ``torch.optim.Optimizer``, already built.
        rho: relative noise size (>= 0), default for groups without a ``"rho"`` key.
        schedule: ``"cosine"`` (needs ``total_steps``) or ``"constant"``.
        total_steps: ``T`` of the cosine ramp (int >= 1).
        seed: 64-bit seed of the noise.
        exact: bit-exact removal (keeps a copy of the weights) or memory-saving subtraction.
        backend: ops backend (None: automatic).
    """

    _state_key = "random_perturb"

    def __init__(
        self,
        optimizer: Optimizer,
        rho: float = 0.05,
        schedule: str = "cosine",
        total_steps: int | None = None,
        *,
        seed: int = 0,
        exact: bool = True,
        backend: str | None = None,
    ) -> None:
        rho = _check_rho("rho", rho)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
        if total_steps is not None:
            total_steps = _int("total_steps", total_steps, 1)
        elif schedule == "cosine":
            raise ValueError("schedule='cosine' needs total_steps (the length T of the ramp)")
        seed = _int("seed", seed, 0)
        if seed >= 2**64:
            raise ValueError(f"seed must be < 2**64, got {seed}")
        _complex.refuse((p for g in optimizer.param_groups for p in g["params"]), "RandomPerturb",
                        "row-scaled noise on a complex weight has no agreed meaning")  # fmt: skip
        for i, g in enumerate(optimizer.param_groups):
            if "rho" in g:
                _check_rho(f"param_groups[{i}]['rho']", g["rho"])
        super().__init__(optimizer)
        for g in self.param_groups:
            g.setdefault("rho", rho)
        self.rho = rho
        self.schedule = schedule
        self.total_steps = total_steps
        self.seed = seed
        self.exact = bool(exact)
        self.backend = backend
        self.step_count = 0
        # Transient (not saved: a checkpoint is taken with the noise removed).
        self._applied: list[tuple[list[Tensor], float, int, list[Tensor] | None]] | None = None
        self._backup: dict[Tensor, Tensor] = {}
        self._window_opened = False  # noise applied since the last step() (see _refuse_unperturbed_step)

    def _repr_fields(self) -> dict[str, Any]:
        return {"rho": self.rho, "schedule": self.schedule, "total_steps": self.total_steps, "exact": self.exact}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "rho" in param_group:
            _check_rho("param_group['rho']", param_group["rho"])
        ps = param_group.get("params", [])
        if not isinstance(ps, (Tensor, set)):  # a generator is read once: keep it as torch would, a list
            ps = param_group["params"] = list(ps)
        if not isinstance(ps, set):  # torch refuses sets itself
            _complex.refuse(
                [ps] if isinstance(ps, Tensor) else ps, "RandomPerturb", "row-scaled noise on a complex weight"
            )
        self.optimizer.add_param_group(param_group)
        self.param_groups[-1].setdefault("rho", self.rho)

    def ramp(self, t: int | None = None) -> float:
        """The schedule factor ``f(t)`` (default: at the current step)."""
        t = self.step_count if t is None else t
        if self.schedule == "constant":
            return 1.0
        T = self.total_steps
        return 0.5 * (1.0 - math.cos(math.pi * min(t + 1, T) / T))

    def step_seed(self, t: int, group: int) -> int:
        """The Philox key of group ``group``'s noise at step ``t``."""
        return mix_seed(self.seed, t, group)

    @property
    def noise_applied(self) -> bool:
        """Whether the weights currently carry noise."""
        return self._applied is not None

    def apply_noise(self) -> None:
        """Move the weights by this step's noise (no-op where ``f(t) * rho == 0``).

        Every group's ``rho`` is re-checked first (groups may have been edited). A transaction:
        if anything raises (``KeyboardInterrupt`` included) the weights are put back before the
        exception propagates, bit for bit (also between two tensors; with ``exact=False`` from the
        moves' transient copies). If that put-back is itself interrupted, the exception carries
        ``exc.pending_restore``: its ``complete()`` finishes it.
        """
        if self._applied is not None:
            raise RuntimeError("RandomPerturb noise is already applied (call remove_noise() first)")
        for gi, g in enumerate(self.param_groups):
            _check_rho(f"param_groups[{gi}]['rho']", g.get("rho", self.rho))
        f = self.ramp()
        applied = []
        moved: list[tuple[list[Tensor], list[Tensor]]] = []
        try:
            for gi, g in enumerate(self.param_groups):
                scale = f * float(g["rho"])
                params = [p for p in g["params"] if p.numel() > 0]
                if scale == 0.0 or not params:
                    continue
                seed = self.step_seed(self.step_count, gi)
                # exact=False: a transient backup, for the transaction of this move only
                backup = self._kept_backup(params) if self.exact else _scratch(params)
                norms = perturb_many_(params, scale, backup=backup, seed=seed, backend=self.backend)
                applied.append((params, scale, seed, None if self.exact else norms))
                moved.append((params, backup))
        except BaseException:
            # Undo the groups already moved, from their copies, so a failure leaves the weights clean.
            self._applied = None
            restore_or_pend_([p for ps, _ in moved for p in ps], [b for _, bs in moved for b in bs],
                             backend=self.backend)  # fmt: skip
            raise
        self._applied = applied
        self._window_opened = True

    def _kept_backup(self, params: list[Tensor]) -> list[Tensor]:
        """The clean-weight copies of ``exact=True``, reused from step to step."""
        return kept_backup(self._backup, params)

    def remove_noise(self) -> None:
        """Take the noise back out (bit-exact with ``exact=True``); no-op when none is applied.

        Completes a pending removal: if an earlier removal was interrupted, :attr:`noise_applied`
        is still True and calling this again finishes it (with ``exact=True`` bit for bit: the
        copy from the backup is idempotent; with ``exact=False``
        each subtraction is a transaction of its own: a group cut mid-way is put back to its noisy
        weights, and calling this again subtracts it in full). If the put-back itself is interrupted,
        call ``exc.pending_restore.complete()`` first, then this.
        """
        if self._applied is None:
            return
        while self._applied:
            params, scale, seed, norms = self._applied[0]
            if norms is None:
                restore_many_(params, [self._backup[p] for p in params], backend=self.backend)
            else:
                perturb_many_(params, -scale, backup=_scratch(params), seed=seed, row_norms=norms,
                              backend=self.backend)  # fmt: skip
            self._applied.pop(0)
        self._applied = None

    @contextmanager
    def perturbed(self) -> Iterator[None]:
        """Context: this step's noise inside, removed on exit (also when the body raises)."""
        self.apply_noise()
        try:
            yield
        finally:
            self.remove_noise()

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """Remove any applied noise, then the inner step; advances the noise schedule by one.

        A ``closure`` is evaluated once under this step's noise, then the inner optimizer steps
        without it. Keywords (fastclu's ``combine=``, ``clip=``) go to the inner step.
        """
        loss = None
        if closure is not None:
            self.remove_noise()
            with torch.enable_grad(), self.perturbed():
                loss = closure()
        else:
            self._refuse_unperturbed_step()
        self.remove_noise()
        self.optimizer.step(**kwargs)
        if not self._inner_step_skipped():  # an AMP-skipped step does not advance the schedule
            self.step_count += 1
        self._window_opened = False
        return loss

    def _refuse_unperturbed_step(self) -> None:
        """Raise when gradients exist, noise is due, but none was applied since the last step.

        That is what a training loop that passes no closure and never opens the window (HF
        ``Trainer`` without :class:`fastclu.integrations.hf.PerturbationCallback`) would do: it
        would silently train at the clean weights.
        """
        if getattr(self, "_window_opened", False):
            return
        f = self.ramp()
        if all(f * float(g["rho"]) == 0.0 for g in self.param_groups):
            return
        stashed = getattr(self.optimizer, "stashed_roles", None)
        if not any(p.grad is not None for p in self.params()) and not (callable(stashed) and stashed()):
            return
        raise RuntimeError(
            "RandomPerturb.step() got gradients but no noise was applied since the last step: they were taken "
            "at the clean weights. Open the window around forward/backward (`with opt.perturbed():` or "
            "apply_noise()), pass a closure to step(), or with transformers.Trainer add "
            "fastclu.integrations.hf.PerturbationCallback(opt) to the callbacks."
        )

    # -- state_dict ------------------------------------------------------------------------------
    def _before_state_dict(self) -> None:
        if self._applied is not None:
            raise RuntimeError("state_dict() while RandomPerturb noise is applied: remove it first")

    def _wrapper_state(self, index: dict[Tensor, int]) -> dict[str, Any]:
        return {
            "rho": self.rho,
            "schedule": self.schedule,
            "total_steps": self.total_steps,
            "seed": self.seed,
            "exact": self.exact,
            "step": self.step_count,
        }

    def _parse_wrapper_state(self, saved: dict[str, Any], params: list[Tensor]) -> Callable[[], None]:
        need = {"rho", "schedule", "total_steps", "seed", "exact", "step"}
        if not isinstance(saved, dict) or not need <= saved.keys():
            raise ValueError(f"state_dict['random_perturb'] must hold {sorted(need)}")
        rho = _check_rho("rho", saved["rho"])
        if saved["schedule"] not in SCHEDULES:
            raise ValueError(f"state_dict['random_perturb']['schedule'] must be one of {list(SCHEDULES)}")
        total = saved["total_steps"]
        if total is not None:
            total = _int("total_steps", total, 1)
        elif saved["schedule"] == "cosine":
            raise ValueError("state_dict['random_perturb']: schedule 'cosine' without total_steps")
        seed = _int("seed", saved["seed"], 0)
        step = _int("step", saved["step"], 0)

        def apply() -> None:
            self.remove_noise()
            self.rho, self.schedule, self.total_steps = rho, saved["schedule"], total
            self.seed, self.exact, self.step_count = seed, bool(saved["exact"]), step
            for g in self.param_groups:
                g.setdefault("rho", rho)

        return apply
