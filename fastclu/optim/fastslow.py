"""Fast-slow weights (the Lookahead family) around any optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastclu import distributed
from fastclu.optim import _complex
from fastclu.optim._wrapper import OptimizerWrapper, _float, _int
from fastclu.perturb import by_device, restore_many_, restore_or_pend_

__all__ = ["FastSlow"]


def _slow_dtype(p: Tensor) -> torch.dtype:
    # fp16/bf16 fast weights get an fp32 master copy: beta * (fast - slow) is often below a bf16
    # ulp of slow, and the slow weights would then never move.
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


class FastSlow(OptimizerWrapper):
    """Fast-slow weights (Lookahead, Zhang et al. 2019) around any optimizer.

    Every ``k``-th call to :meth:`step` (after the inner step), in one fused pass per device
    (:func:`fastclu.ops.lerp_sync_`)::

        slow = slow + beta * (fast - slow);  fast = slow

    ``slow`` starts as the weights at the first ``step()`` that sees a parameter (so weights
    loaded into the model after building the optimizer are respected). Slow weights are fp32
    for fp16/bf16 parameters, else the parameter's dtype. The inner optimizer's state (momentum,
    Adam moments) carries over each sync unchanged. ``k``, ``beta``, the step counter and the
    slow weights are in ``state_dict()``. Complex parameters sync as real views (their slow
    weights are complex).

    The sync is a transaction (``transactional=True``, the default): the new slow and fast weights
    are computed into scratch copies (one transient copy of both, per device), then committed by
    plain copies. An exception (``KeyboardInterrupt`` included) before the commit leaves every
    weight as it was (``sync_()`` again syncs); one during the commit is finished before it
    propagates, and if that is interrupted too, ``exc.pending_restore.complete()`` finishes it bit
    for bit. ``transactional=False``: one fused in-place pass, no scratch, but an interrupt between
    two tensors leaves the weights partly synced.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (torch's or fastclu's), already built.
        k: sync period in steps (int >= 1).
        beta: slow step size in [0, 1]; ``k=1, beta=1`` is the inner optimizer itself.
        backend: ops backend (None: automatic).
        transactional: sync through scratch copies (see above) or in place.
    """

    _state_key = "fastslow"

    def __init__(
        self,
        optimizer: Optimizer,
        k: int = 5,
        beta: float = 0.5,
        *,
        backend: str | None = None,
        transactional: bool = True,
    ) -> None:
        k = _int("k", k, 1)
        beta = _float("beta", beta, 0.0, 1.0)
        super().__init__(optimizer)
        self.k = k
        self.beta = beta
        self.backend = backend
        self.transactional = bool(transactional)
        self.step_count = 0
        self._slow: dict[Tensor, Tensor] = {}

    def _repr_fields(self) -> dict[str, Any]:
        return {"k": self.k, "beta": self.beta}

    def slow_weights(self) -> list[Tensor | None]:
        """The slow weights aligned with :meth:`params` (None where not yet initialised)."""
        return [self._slow.get(p) for p in self.params()]

    def _new_slow(self) -> dict[Tensor, Tensor]:
        """Slow weights for parameters seen for the first time (not recorded until the step succeeds)."""
        with torch.no_grad():
            return {p: p.detach().to(_slow_dtype(p), copy=True) for p in self.params() if p not in self._slow}

    def sync_(self) -> None:
        """Sync now: ``slow += beta * (fast - slow); fast = slow`` for every initialised parameter
        (a transaction unless ``transactional=False``: see the class docstring)."""
        fast = [p for p in self.params() if p in self._slow]
        groups = [(distributed.local_list([self._slow[fast[i]] for i in idx]),
                   distributed.local_list([fast[i] for i in idx])) for idx in by_device(fast).values()]  # fmt: skip
        with torch.no_grad():
            if not self.transactional:
                for slow, fst in groups:
                    _complex.lerp_sync_(slow, fst, self.beta, backend=self.backend)
                return
            targets, sources = self._scratch_sync(groups)
            # Commit: plain copies, idempotent, so a commit cut short is finished by copying again.
            try:
                restore_many_(targets, sources, backend=self.backend)
            except BaseException:
                restore_or_pend_(targets, sources, backend=self.backend)
                raise

    def _scratch_sync(self, groups: list[tuple[list[Tensor], list[Tensor]]]) -> tuple[list[Tensor], list[Tensor]]:
        """The synced slow and fast weights computed into scratch copies (nothing visible changes);
        returns (the weights, their new values) as real views."""
        targets: list[Tensor] = []
        sources: list[Tensor] = []
        try:
            for slow, fst in groups:
                s_new = [torch.empty_like(s, memory_format=torch.contiguous_format) for s in slow]
                f_new = [torch.empty_like(f, memory_format=torch.contiguous_format) for f in fst]
                _complex.restore_(s_new + f_new, slow + fst, backend=self.backend)
                _complex.lerp_sync_(s_new, f_new, self.beta, backend=self.backend)
                targets += _complex.real_list(slow + fst)
                sources += _complex.real_list(s_new + f_new)
        except BaseException as exc:
            exc.add_note("fastclu: FastSlow.sync_ was interrupted before it changed any weight; sync_() syncs")
            raise
        return targets, sources

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """Inner step (``closure`` and keywords passed through), then a sync every ``k``-th call.

        ``k`` and ``beta`` are re-checked first (they may have been edited). Slow weights of
        parameters seen for the first time are copied before the inner step but recorded only
        once it returns, so a step that raises leaves the wrapper as it was.
        """
        _int("k", self.k, 1)
        _float("beta", self.beta, 0.0, 1.0)
        new = self._new_slow()
        loss = self._inner_step(closure, **kwargs)
        self._slow.update(new)
        if self._inner_step_skipped():
            return loss  # AMP skipped the update: it does not count towards the sync period
        self.step_count += 1
        if self.step_count % self.k == 0:
            self.sync_()
        return loss

    def _wrapper_state(self, index: dict[Tensor, int]) -> dict[str, Any]:
        return {
            "k": self.k,
            "beta": self.beta,
            "step": self.step_count,
            "slow": {index[p]: s for p, s in self._slow.items() if p in index},
        }

    def _parse_wrapper_state(self, saved: dict[str, Any], params: list[Tensor]) -> Callable[[], None]:
        if not isinstance(saved, dict) or not {"k", "beta", "step", "slow"} <= saved.keys():
            raise ValueError("state_dict['fastslow'] must hold 'k', 'beta', 'step' and 'slow'")
        k = _int("state_dict['fastslow']['k']", saved["k"], 1)
        beta = _float("state_dict['fastslow']['beta']", saved["beta"], 0.0, 1.0)
        step = _int("state_dict['fastslow']['step']", saved["step"], 0)
        if not isinstance(saved["slow"], dict):
            raise TypeError(f"state_dict['fastslow']['slow'] must be a dict index -> tensor, got "
                            f"{type(saved['slow']).__name__}")  # fmt: skip
        slow: dict[Tensor, Tensor] = {}
        for i, s in saved["slow"].items():
            if not isinstance(i, int) or not 0 <= i < len(params):
                raise ValueError(f"state_dict['fastslow']['slow'] has index {i!r}, but there are {len(params)} params")
            p = params[i]
            if not isinstance(s, Tensor) or not s.is_floating_point() or s.shape != p.shape:
                raise ValueError(
                    f"state_dict['fastslow']['slow'][{i}] must be a float tensor of shape {tuple(p.shape)}"
                )
            slow[p] = s.detach().to(device=p.device, dtype=_slow_dtype(p), copy=True)

        def apply() -> None:
            self.k, self.beta, self.step_count, self._slow = k, beta, step, slow

        return apply
