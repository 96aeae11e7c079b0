"""Perturb-and-Merge (P&M) for continual learning, around any optimizer."""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastclu import distributed, ops
from fastclu._scalars import check_scalar
from fastclu.merge import accumulate_task_, merge_task_
from fastclu.optim import _complex
from fastclu.optim._wrapper import OptimizerWrapper, _int, kept_backup
from fastclu.perturb import by_device, perturb_many_, restore_many_

__all__ = ["PerturbMerge"]

_PER_PARAM = ("anchor", "fisher", "fisher_sum", "fisher_theta_sum")


def _check_probs(probs: object) -> tuple[float, float, float]:
    if isinstance(probs, (str, bytes)) or not isinstance(probs, Sequence) or len(probs) != 3:
        raise ValueError(f"probs must be three probabilities (p0, p_plus, p_minus), got {probs!r}")
    ps = []
    for x in probs:
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or x < 0:
            raise ValueError(f"probs must be finite non-negative numbers, got {probs!r}")
        ps.append(float(x))
    total = sum(ps)
    if total <= 0:
        raise ValueError(f"probs must not all be zero, got {probs!r}")
    return ps[0] / total, ps[1] / total, ps[2] / total


def _check_eps(eps: object) -> float:
    return float(check_scalar("eps", eps, lo=0.0, tensor_ok=False))


class PerturbMerge(OptimizerWrapper):
    """Perturb-and-Merge: train each task at ``theta + k*eps*delta``, merge in closed form after it.

    ``delta = theta - theta_prev`` is the task vector from the previous merged model; ``k`` is
    drawn from {0, +1, -1} with probabilities ``probs`` on every entry into :meth:`perturbed`,
    from a private ``torch.Generator`` seeded with ``seed`` (the global RNG is not touched).
    Averaged over ``k``, the gradient picks up a finite-difference estimate of the loss's
    curvature along the task vector. During the first task there is no ``theta_prev``: no
    perturbation, and no draw.

    Typical loop::

        opt = PerturbMerge(torch.optim.SGD(model.parameters(), lr=0.1), eps=0.5)
        for task in tasks:
            for x, y in task:
                opt.zero_grad()
                with opt.perturbed():            # weights at theta + k*eps*delta inside
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                # weights restored bit for bit here (also if the block raised)
                opt.accumulate_fisher()          # F += grad**2 (optional: any batches you like)
                opt.step()
            alpha = opt.end_task()               # merge; theta_prev = merged weights

    :meth:`end_task` uses the task's mean Fisher ``F = (sum of grad**2) / (number of
    accumulate_fisher calls)``, updates ``S_F += F``, ``S_Ftheta += F * theta``, computes
    ``alpha`` (see :mod:`fastclu.merge`), sets ``theta = theta_prev + alpha*(theta - theta_prev)``,
    then ``theta_prev = theta`` and ``F = 0``. ``end_task(normalize=True)`` enters ``F / trace(F)``
    instead (a departure from the paper, see :meth:`end_task`). Parameters added with ``add_param_group`` during a
    task are not perturbed nor merged in that task; their ``theta_prev`` is recorded at its end.

    Memory: ``theta_prev`` and the backup in the parameters' dtype, ``F``, ``S_F``, ``S_Ftheta``
    in fp32 (five extra copies for fp32 weights). Everything except the backup is in
    ``state_dict()`` (with the generator's state), so a run resumes bit-identically.

    Args:
        optimizer: any ``torch.optim.Optimizer``, already built.
        eps: perturbation size (>= 0); the paper's default 0.5.
        probs: ``(p0, p_plus, p_minus)`` for ``k = 0, +1, -1``, normalised to sum 1.
        seed: seed of the private generator drawing ``k``.
        fold_restore: keep the weights perturbed after :meth:`perturbed` and let the next
            :meth:`step` read the clean weights from the backup (one pass fewer). Needs an inner
            optimizer whose ``step`` accepts ``restore_from=`` (fastclu's); the block's body must
            then be followed by ``step()`` before the weights are used (:meth:`state_dict`,
            :meth:`perturbed` and :meth:`end_task` restore first if a step was skipped).
        backend: ops backend (None: automatic).
    """

    _state_key = "perturb_merge"

    def __init__(
        self,
        optimizer: Optimizer,
        eps: float = 0.5,
        probs: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
        *,
        seed: int = 0,
        fold_restore: bool = False,
        backend: str | None = None,
    ) -> None:
        eps = _check_eps(eps)
        probs_t = _check_probs(probs)
        seed = _int("seed", seed, 0)
        if fold_restore and "restore_from" not in inspect.signature(optimizer.step).parameters:
            raise ValueError(
                "fold_restore=True needs an inner optimizer whose step() accepts restore_from= "
                f"(fastclu.optim.SGD/AdamW); {type(optimizer).__name__}.step does not"
            )
        _complex.refuse((p for g in optimizer.param_groups for p in g["params"]), "PerturbMerge",
                        "its Fisher-weighted merge coefficient is defined for real weights")  # fmt: skip
        super().__init__(optimizer)
        self.eps = eps
        self.probs = probs_t
        self.seed = seed
        self.fold_restore = bool(fold_restore)
        self.backend = backend
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.task = 0
        self.draws = 0
        self.fisher_count = 0
        self.last_k = 0
        self.last_alpha: Tensor | None = None
        self._pp: dict[Tensor, dict[str, Tensor]] = {}  # per-param: anchor, fisher, fisher_sum, fisher_theta_sum
        self._backup: dict[Tensor, Tensor] = {}  # transient, not saved
        self._inside = False
        self._pending: list[Tensor] | None = None  # params whose restore was folded into the next step
        self._window_opened = False  # perturbed() entered since the last step() (see _refuse_unperturbed_step)

    def _repr_fields(self) -> dict[str, Any]:
        return {"eps": self.eps, "probs": self.probs, "seed": self.seed, "task": self.task}

    # -- per-parameter state ----------------------------------------------------------------
    def _entry(self, p: Tensor) -> dict[str, Tensor]:
        e = self._pp.get(p)
        if e is None:
            # zeros_like: a DTensor parameter's statistics are DTensor shards like it.
            z = lambda: torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            e = self._pp[p] = {"fisher": z(), "fisher_sum": z(), "fisher_theta_sum": z()}
        return e

    def anchors(self) -> list[Tensor | None]:
        """``theta_prev`` aligned with :meth:`params` (None before the first :meth:`end_task`)."""
        return [self._pp.get(p, {}).get("anchor") for p in self.params()]

    def _draw(self) -> int:
        u = float(torch.rand((), generator=self.generator))
        self.draws += 1
        p0, p1, _ = self.probs
        return 0 if u < p0 else (1 if u < p0 + p1 else -1)

    @property
    def restore_pending(self) -> bool:
        """Whether some weights are still perturbed, waiting for :meth:`restore` (or the next step)."""
        return self._pending is not None

    def restore(self) -> None:
        """Put the clean weights back now, bit for bit, if a restore is pending; else a no-op.

        A restore is pending after a :meth:`perturbed` block with ``fold_restore=True`` (the next
        :meth:`step` would fold it), or when the exit restore of :meth:`perturbed` or a failing
        folded step was interrupted (``KeyboardInterrupt`` ...): calling this again completes it
        (the copy from the backup is idempotent). :meth:`perturbed`, :meth:`end_task` and
        :meth:`state_dict` call it first.
        """
        if self._pending is not None:
            pend = self._pending
            restore_many_(pend, [self._backup[p] for p in pend], backend=self.backend)
            self._pending = None

    @contextmanager
    def perturbed(self) -> Iterator[int]:
        """Context: weights at ``theta + k*eps*delta`` inside, restored bit for bit on exit.

        Draws ``k`` (yielded) unless no parameter has a ``theta_prev`` yet (first task: ``k=0``,
        no draw). The restore happens also when the body raises. With ``fold_restore`` and a
        normal exit, the restore is left to the next :meth:`step`.
        """
        if self._inside:
            raise RuntimeError("PerturbMerge.perturbed() is already active (it does not nest)")
        # eps and probs may have been edited since the constructor: re-checked before any draw.
        self.eps = _check_eps(self.eps)
        self.probs = _check_probs(self.probs)
        self.restore()
        self._window_opened = True
        params = [p for p in self.params() if "anchor" in self._pp.get(p, {})]
        k = self._draw() if params else 0
        self.last_k = k
        if k == 0 or self.eps == 0.0:
            self._inside = True
            try:
                yield k
            finally:
                self._inside = False
            return
        backup = kept_backup(self._backup, params)
        # A transaction: the backups are written before the first tensor moves, and a move
        # interrupted half-way is undone inside perturb_many_.
        perturb_many_(params, k * self.eps, backup=backup, anchor=[self._pp[p]["anchor"] for p in params],
                      backend=self.backend)  # fmt: skip
        self._inside = True
        # Pending from here on: if the exit restore below is interrupted, restore() finishes it.
        self._pending = params
        ok = False
        try:
            yield k
            ok = True
        finally:
            self._inside = False
            if not (ok and self.fold_restore):
                self.restore()

    def accumulate_fisher(self, scale: float = 1.0) -> None:
        """After a backward: ``F += scale * grad**2`` for every parameter with a gradient.

        Counts one batch for the task's mean Fisher (see :meth:`end_task`).
        """
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
        ps = [p for p in self.params() if p.grad is not None]
        for i, p in enumerate(ps):
            if p.grad.is_sparse:
                raise TypeError(f"PerturbMerge does not support sparse gradients (param {i})")
        fis = [self._entry(p)["fisher"] for p in ps]
        grads = [p.grad.contiguous() for p in ps]
        with torch.no_grad():
            for idx in by_device(ps).values():
                ops.fisher_accumulate_(distributed.local_list([fis[i] for i in idx]),
                                       distributed.local_list([grads[i] for i in idx]), float(scale),
                                       backend=self.backend)  # fmt: skip
        self.fisher_count += 1

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """Inner step (keywords passed through). A ``closure`` is evaluated once under
        :meth:`perturbed`, then the inner optimizer steps without it (the gradients it leaves
        are those at the perturbed point)."""
        if self._inside:
            raise RuntimeError("step() called inside PerturbMerge.perturbed(): leave the block first")
        loss = None
        if closure is not None:
            with torch.enable_grad(), self.perturbed():
                loss = closure()
        else:
            self._refuse_unperturbed_step()
        self._window_opened = False
        if self._pending is not None:
            pend = self._pending
            # Fold: the update reads theta from the backup and writes params, so params never
            # hold the clean weights in between. Params without an anchor were not moved and
            # read themselves.
            moved = set(pend)
            restore_from = [self._backup[p] if p in moved else p for p in self.params()]
            try:
                self.optimizer.step(restore_from=restore_from, **kwargs)
            except BaseException:
                # The step failed (bad argument, interrupt): land the clean weights instead of
                # leaving them perturbed; the backup is untouched by the step.
                self.restore()
                raise
            self._pending = None
            # A parameter without a gradient is skipped by the step, so its fold never happened.
            idle = [p for p in pend if p.grad is None]
            if idle:
                restore_many_(idle, [self._backup[p] for p in idle], backend=self.backend)
        else:
            self.optimizer.step(**kwargs)
        return loss

    def _refuse_unperturbed_step(self) -> None:
        """Raise when gradients exist and a perturbation is due (a task vector exists, ``eps > 0``,
        ``p0 < 1``) but :meth:`perturbed` was not entered since the last step: a loop passing no
        closure (HF ``Trainer`` without :class:`fastclu.integrations.hf.PerturbationCallback`)
        would otherwise silently train at the unperturbed weights."""
        if getattr(self, "_window_opened", False) or self.eps == 0.0 or self.probs[0] >= 1.0:
            return
        params = self.params()
        if not any("anchor" in self._pp.get(p, {}) for p in params):
            return
        stashed = getattr(self.optimizer, "stashed_roles", None)
        if not any(p.grad is not None for p in params) and not (callable(stashed) and stashed()):
            return
        raise RuntimeError(
            "PerturbMerge.step() got gradients but perturbed() was not entered since the last step: they were "
            "taken at the unperturbed weights. Run forward/backward inside `with opt.perturbed():`, pass a "
            "closure to step(), or with transformers.Trainer add "
            "fastclu.integrations.hf.PerturbationCallback(opt) to the callbacks."
        )

    def fisher_trace(self) -> Tensor:
        """Trace (sum over every element) of the current task's mean Fisher, fp32 0-d tensor.

        On the first parameter's device (CPU when there is none); 0 before any
        :meth:`accumulate_fisher` call of the task. A diagnostic: with cross-entropy, a task fit
        to a near-zero loss has a near-zero empirical Fisher (about the loss squared), which is
        what drives ``alpha`` towards 0 or 1 when tasks are fit to very different loss levels.
        """
        return self._fisher_sum() / max(self.fisher_count, 1)

    def _fisher_sum(self) -> Tensor:
        params = self.params()
        dev = params[0].device if params else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float32, device=dev)
        with torch.no_grad():
            for p in params:
                e = self._pp.get(p)
                if e is not None:
                    total = total + e["fisher"].sum().to(dev)
        return total

    def end_task(self, *, normalize: bool = False) -> Tensor | None:
        """Close the task: update the Fisher sums, merge, record ``theta_prev``, reset ``F``.

        Args:
            normalize: enter the task's Fisher scaled to unit trace, ``F / sum(F)``, instead of
                its mean (the paper's choice, the default). Not in the P&M paper: it weighs every
                task equally in the quadratic model whatever loss level the task was fit to (as
                normalised Fisher merging does), for regimes where the empirical Fishers of the
                tasks differ by orders of magnitude. A task with a zero Fisher enters nothing.

        Returns ``alpha`` (fp32 0-d tensor), or None after the first task (which only records
        the weights). Warns when no :meth:`accumulate_fisher` call happened in the task.
        """
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        if self._inside:
            raise RuntimeError("end_task() called inside PerturbMerge.perturbed()")
        self.restore()
        if self.fisher_count == 0:
            warnings.warn("PerturbMerge.end_task(): no accumulate_fisher() call in this task; its Fisher is 0",
                          stacklevel=2)  # fmt: skip
        params = self.params()
        entries = [self._entry(p) for p in params]
        self._check_finite(params, entries)
        scale: float | Tensor = 1.0 / max(self.fisher_count, 1)
        if normalize:
            # A 0-d tensor, not a float: no host sync at the task boundary.
            tr = self._fisher_sum()
            scale = torch.where(tr > 0, 1.0 / torch.where(tr > 0, tr, torch.ones_like(tr)), torch.zeros_like(tr))
        # Into copies of the sums, committed only once alpha is known to be finite: a failing
        # merge leaves the sums, the anchors and the weights as they were.
        sums = {p: (e["fisher_sum"].clone(), e["fisher_theta_sum"].clone()) for p, e in zip(params, entries)}
        accumulate_task_([sums[p][0] for p in params], [sums[p][1] for p in params],
                         [e["fisher"] for e in entries], params, scale=scale)  # fmt: skip
        merged = [p for p, e in zip(params, entries) if "anchor" in e]
        alpha = None
        if merged:
            alpha = merge_task_(merged, [self._pp[p]["anchor"] for p in merged], [sums[p][0] for p in merged],
                                [sums[p][1] for p in merged], backend=self.backend,
                                label=f"PerturbMerge task {self.task}")  # fmt: skip
        for p, e in zip(params, entries):
            e["fisher_sum"], e["fisher_theta_sum"] = sums[p]
        with torch.no_grad():
            for p, e in zip(params, entries):
                if "anchor" in e:
                    e["anchor"].copy_(p)
                else:
                    e["anchor"] = p.detach().clone(memory_format=torch.contiguous_format)
                e["fisher"].zero_()
        self.fisher_count = 0
        self.task += 1
        self.last_alpha = alpha
        return alpha

    def _check_finite(self, params: list[Tensor], entries: list[dict[str, Tensor]]) -> None:
        """Refuse a diverged task (non-finite Fisher, weights or anchor) before anything moves.

        One host sync per task (not per step).
        """
        with torch.no_grad():
            for i, (p, e) in enumerate(zip(params, entries)):
                for what, t in (("Fisher", e["fisher"]), ("weights", p), ("theta_prev", e.get("anchor"))):
                    if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
                        raise ValueError(
                            f"PerturbMerge.end_task(): task {self.task} has non-finite {what} in parameter {i}; "
                            "nothing was merged (the task diverged: lower the learning rate or skip the task)"
                        )

    # -- state_dict ------------------------------------------------------------------------------
    def _before_state_dict(self) -> None:
        if self._inside:
            raise RuntimeError("state_dict() called inside PerturbMerge.perturbed(): the weights are moved")
        self.restore()

    def _wrapper_state(self, index: dict[Tensor, int]) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "probs": list(self.probs),
            "seed": self.seed,
            "generator": self.generator.get_state(),
            "task": self.task,
            "draws": self.draws,
            "fisher_count": self.fisher_count,
            "last_alpha": self.last_alpha,
            "params": {index[p]: dict(e) for p, e in self._pp.items() if p in index},
        }

    def _parse_wrapper_state(self, saved: dict[str, Any], params: list[Tensor]) -> Callable[[], None]:
        need = {"eps", "probs", "seed", "generator", "task", "draws", "fisher_count", "params"}
        if not isinstance(saved, dict) or not need <= saved.keys():
            raise ValueError(f"state_dict['perturb_merge'] must hold {sorted(need)}")
        eps = _check_eps(saved["eps"])
        probs = _check_probs(saved["probs"])
        seed = _int("seed", saved["seed"], 0)
        task = _int("task", saved["task"], 0)
        draws = _int("draws", saved["draws"], 0)
        fisher_count = _int("fisher_count", saved["fisher_count"], 0)
        gen_state = saved["generator"]
        if not isinstance(gen_state, Tensor) or gen_state.dtype != torch.uint8:
            raise ValueError("state_dict['perturb_merge']['generator'] must be a uint8 tensor (Generator state)")
        gen = torch.Generator(device="cpu")
        try:
            gen.set_state(gen_state.cpu())
        except RuntimeError as exc:
            raise ValueError(f"state_dict['perturb_merge']['generator'] is not a CPU Generator state: {exc}") from None
        if not isinstance(saved["params"], dict):
            raise TypeError(f"state_dict['perturb_merge']['params'] must be a dict index -> dict, got "
                            f"{type(saved['params']).__name__}")  # fmt: skip
        pp: dict[Tensor, dict[str, Tensor]] = {}
        for i, e in saved["params"].items():
            if not isinstance(i, int) or not 0 <= i < len(params):
                raise ValueError(f"state_dict['perturb_merge']['params'] has index {i!r}; there are {len(params)}")
            p = params[i]
            if not isinstance(e, dict) or not set(e) <= set(_PER_PARAM):
                raise ValueError(f"state_dict['perturb_merge']['params'][{i}] must be a dict with keys in {_PER_PARAM}")
            new = {}
            for key, t in e.items():
                if not isinstance(t, Tensor) or not t.is_floating_point() or t.shape != p.shape:
                    raise ValueError(f"state_dict['perturb_merge']['params'][{i}][{key!r}] must have shape "
                                     f"{tuple(p.shape)}")  # fmt: skip
                dtype = p.dtype if key == "anchor" else torch.float32
                new[key] = t.detach().to(device=p.device, dtype=dtype, memory_format=torch.contiguous_format,
                                         copy=True)  # fmt: skip
            pp[p] = new
        last_alpha = saved.get("last_alpha")
        if last_alpha is not None:
            if not isinstance(last_alpha, Tensor) or last_alpha.numel() != 1:
                raise ValueError("state_dict['perturb_merge']['last_alpha'] must be None or a 1-element tensor")
            dev = params[0].device if params else last_alpha.device
            last_alpha = last_alpha.detach().to(device=dev, dtype=torch.float32, copy=True).reshape(())

        def apply() -> None:
            # A restore still pending from a folded step is dropped, not landed: loading a
            # checkpoint replaces the training state, and the model's weights come from the
            # model's own checkpoint (landing it could overwrite weights loaded just before).
            self._pending = None
            self.eps, self.probs, self.seed, self.generator = eps, probs, seed, gen
            self.task, self.draws, self.fisher_count, self.last_alpha = task, draws, fisher_count, last_alpha
            self._pp = pp
            self._backup = {}

        return apply
