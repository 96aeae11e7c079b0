"""The base of fastclu's optimizer wrappers (:class:`fastclu.optim.FastSlow`,
:class:`fastclu.optim.PerturbMerge`, :class:`fastclu.optim.RandomPerturb`).

:class:`OptimizerWrapper` shares the inner optimizer's ``param_groups``, ``state`` and
``defaults`` (so LR schedulers, GradScaler's ``unscale_`` and checkpointing code see the real
thing) and nests its own state under one key of the inner optimizer's ``state_dict``.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastclu._scalars import check_scalar

__all__ = ["OptimizerWrapper"]

_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class OptimizerWrapper(Optimizer):
    """Base class: an optimizer that adds behaviour around another one (``self.optimizer``).

    ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's own objects.
    ``state_dict()`` is the inner state dict plus one entry ``{_state_key: ...}`` holding the
    wrapper's state, with per-parameter tensors keyed by the same integer index torch uses
    (position in the concatenated ``param_groups``). Wrappers nest:
    ``FastSlow(PerturbMerge(SGD(...)))`` works.

    AMP: ``_step_supports_amp_scaling``, ``grad_scale`` and ``found_inf`` are the inner
    optimizer's. Around fastclu's SGD/AdamW, ``GradScaler`` hands the scale to the fused step,
    which unscales every role (stashes included), skips on a non-finite unmasked value and
    leaves ``.grad`` unscaled (as torch's fused optimizers); the wrapper then sees whether the
    step was skipped (:meth:`_inner_step_skipped`, one host sync under AMP) and does not count
    a skipped step. Around torch's optimizers ``GradScaler`` unscales ``.grad`` itself and skips
    ``step()`` altogether on inf/NaN, as before.
    """

    _state_key = "wrapper"

    @property
    def _step_supports_amp_scaling(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    # GradScaler sets and deletes these on the optimizer it is given: they belong to the inner one.
    @property
    def grad_scale(self) -> Any:
        return self.optimizer.grad_scale  # AttributeError when unset, as on a plain optimizer

    @grad_scale.setter
    def grad_scale(self, value: Any) -> None:
        self.optimizer.grad_scale = value

    @grad_scale.deleter
    def grad_scale(self) -> None:
        if hasattr(self.optimizer, "grad_scale"):
            del self.optimizer.grad_scale

    @property
    def found_inf(self) -> Any:
        return self.optimizer.found_inf

    @found_inf.setter
    def found_inf(self, value: Any) -> None:
        self.optimizer.found_inf = value

    @found_inf.deleter
    def found_inf(self) -> None:
        if hasattr(self.optimizer, "found_inf"):
            del self.optimizer.found_inf

    @property
    def last_found_inf(self) -> Any:
        return getattr(self.optimizer, "last_found_inf", None)

    def _inner_step_skipped(self) -> bool:
        """Whether the inner step just taken was skipped by AMP (False outside ``GradScaler``)."""
        scaler_inf = getattr(self, "found_inf", None)
        if scaler_inf is None:
            return False
        found = self.last_found_inf
        found = scaler_inf if found is None else found
        return bool(found.reshape(()) != 0) if isinstance(found, Tensor) else bool(found)

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        # Optimizer.__init__ is not called: it would build a second set of param_groups, and the
        # point is to share the inner optimizer's. Only the hook machinery is set up here.
        self.optimizer = optimizer
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    # The inner optimizer's objects, not copies: schedulers edit group["lr"] in place.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self._repr_fields().items())
        return f"{type(self).__name__}({self.optimizer!r}{', ' if extra else ''}{extra})"

    def _repr_fields(self) -> dict[str, Any]:
        return {}

    def params(self) -> list[Tensor]:
        """All parameters, in ``state_dict`` index order."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __getattr__(self, name: str) -> Any:
        # Public attributes the wrapper lacks come from the inner optimizer, so fastclu's
        # stash()/set_mask() or an inner wrapper's perturbed() stay reachable through a stack.
        if name.startswith("_") or name == "optimizer":
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.optimizer, name)

    def _inner_step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """The inner ``step``; extra keywords (fastclu's ``combine=``, ``clip=``) are passed through."""
        return self.optimizer.step(closure, **kwargs) if closure is not None else self.optimizer.step(**kwargs)

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:  # pragma: no cover
        return self._inner_step(closure, **kwargs)

    # -- state_dict ------------------------------------------------------------------------
    def _wrapper_state(self, index: dict[Tensor, int]) -> dict[str, Any]:
        """The wrapper's own state; ``index`` maps each parameter to its state_dict index."""
        return {}

    def _parse_wrapper_state(self, saved: dict[str, Any], params: list[Tensor]) -> Callable[[], None]:
        """Validate ``saved`` against ``params`` and return a function applying it (no change yet)."""
        return lambda: None

    def _before_state_dict(self) -> None:
        """Hook for subclasses: settle transient state (e.g. a pending restore) before saving."""

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus ``{_state_key: wrapper state}``."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        self._before_state_dict()
        sd = dict(self.optimizer.state_dict())
        if self._state_key in sd:
            raise RuntimeError(f"the inner optimizer's state_dict already has a {self._state_key!r} entry")
        index = {p: i for i, p in enumerate(self.params())}
        sd[self._state_key] = self._wrapper_state(index)
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict made by :meth:`state_dict`; validates the wrapper part before changing anything."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        if self._state_key not in state_dict:
            raise ValueError(f"state_dict has no {self._state_key!r} entry (was it saved by {type(self).__name__}?)")
        inner = {k: v for k, v in state_dict.items() if k != self._state_key}
        apply = self._parse_wrapper_state(state_dict[self._state_key], self.params())
        self.optimizer.load_state_dict(inner)
        apply()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


def kept_backup(cache: dict[Tensor, Tensor], params: list[Tensor]) -> list[Tensor]:
    """Clean-weight copies of ``params`` reused from step to step (a new one where a parameter
    changed shape, dtype or device): the perturbing wrappers' backups."""
    backup = []
    for p in params:
        b = cache.get(p)
        if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
            b = cache[p] = torch.empty_like(p, memory_format=torch.contiguous_format)
        backup.append(b)
    return backup


def _int(name: str, x: object, lo: int) -> int:
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        x = int(x)  # numpy integers
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < lo:
        raise ValueError(f"{name} must be >= {lo}, got {x}")
    return x


def _float(name: str, x: object, lo: float, hi: float) -> float:
    return float(check_scalar(name, x, lo=lo, hi=hi, tensor_ok=False))
