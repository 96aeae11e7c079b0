"""Shared machinery of fastclu's SGD / AdamW: role gradients, saliency masks, clipping, anchor penalty.

A step gathers, per parameter, the gradients of the roles named in ``combine`` (``"grad"`` is the
live ``.grad``, other names are gradients kept by :meth:`RoleOptimizer.stash`), optionally computes
the global norm of their masked combination with one :func:`fastclu.ops.gram` pass, and applies
one fused :func:`fastclu.ops.combine_step_` per (param group, device, dtype, state layout).

Everything a step depends on lives in ``state_dict()``: per-parameter state holds the optimizer
buffers (fp32; fp64 for fp64 parameters), the packed mask (``"mask"``), the anchor penalty
(``"importance"``, ``"anchor"``) and the stashed roles (``"stash.<role>"``); param groups hold
``mask_mode``, ``mask_roles`` and ``penalty``. A checkpoint therefore resumes bit-identically.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from fastclu import distributed, ops
from fastclu._registry import BACKENDS
from fastclu._scalars import check_scalar
from fastclu.optim import _complex

STASH = "stash."
GRAD = "grad"
MAX_ROLES = 4
# Per-parameter buffers of fastclu's (and torch's) SGD / AdamW: one optimizer's state must not
# load into the other.
_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KNOWN_BUFFERS = frozenset({"momentum_buffer", "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})


def _numpy_to_float_(group: dict[str, Any]) -> None:
    """numpy scalar hyper-parameters (``np.float32(0.1)``) become Python floats, as the ops take them."""
    for k, v in group.items():
        if isinstance(v, np.generic) and isinstance(v, numbers.Real) and not isinstance(v, np.bool_):
            group[k] = float(v)
        elif k == "betas" and isinstance(v, tuple) and any(isinstance(b, np.generic) for b in v):
            group[k] = tuple(float(b) for b in v)


def _check_state_value(name: str, key: Any, v: object, p: Tensor, own: set[str]) -> None:
    """One saved per-parameter state value against its parameter ``p``."""
    if key == "step":
        if isinstance(v, Tensor):
            if v.numel() != 1 or v.is_complex():
                raise ValueError(f"{name} must be a 1-element real tensor, got shape {tuple(v.shape)}")
        elif isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or v < 0:
            raise ValueError(f"{name} must be a step count >= 0, got {v!r}")
        return
    shaped = key in own or key in ("importance", "anchor") or (isinstance(key, str) and key.startswith(STASH))
    if shaped:
        _complex.check_like(name, v, p)  # complex: complex state for complex parameters, as torch's
        if v.shape != p.shape:
            raise ValueError(f"{name} has shape {tuple(v.shape)} but the parameter has {tuple(p.shape)}")
    elif key == "mask":
        if not isinstance(v, Tensor) or v.dtype != torch.uint8:
            raise TypeError(f"{name} must be a bit-packed uint8 tensor")
        n = distributed.local(p).numel()  # a DTensor parameter's mask covers its local shard
        if v.numel() != ops.packed_numel(n):
            raise ValueError(
                f"{name} has {v.numel()} bytes but the parameter ({n} elements) needs {ops.packed_numel(n)}"
            )


class SparseGradientError(TypeError, RuntimeError):
    """A sparse gradient reached a fastclu optimizer (dense tensors only)."""


def state_dtype(p: Tensor) -> torch.dtype:
    """Dtype of the optimizer state of ``p``: fp32, or fp64 for fp64 parameters (complex: its own)."""
    if p.is_complex():  # complex: stepped as real views (fastclu.optim._complex)
        return _complex.state_dtype(p)
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _as_scalar(name: str, x: object, **bounds: Any) -> float | Tensor:
    """``x`` checked by :func:`fastclu._scalars.check_scalar` (finite, within ``bounds``).

    1-element tensors on the CPU are always checked; on an accelerator only with
    ``sync_ok=True`` (where a value is set, not per step: see :mod:`fastclu._scalars`).
    """
    return check_scalar(name, x, **bounds)


def _param_names(names: Any, params: list[Tensor]) -> list[str] | None:
    """The optimizer parameters' names from ``names`` (a Module, ``{name: param}`` or a list), or None."""
    if names is None:
        return None
    if isinstance(names, torch.nn.Module):
        names = dict(names.named_parameters())
    if isinstance(names, Mapping):
        by_id = {id(t): n for n, t in names.items()}
        out = []
        for i, p in enumerate(params):
            if id(p) not in by_id:
                raise ValueError(f"names: parameter {i} of the optimizer (shape {tuple(p.shape)}) has no name there")
            out.append(by_id[id(p)])
        return out
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError("names must be an nn.Module, a {name: parameter} mapping or a list of names")
    if len(names) != len(params):
        raise ValueError(f"names has {len(names)} entries but the optimizer has {len(params)} parameters")
    return list(names)


def _mask_entries(mask: Any, params: list[Tensor], pnames: list[str] | None) -> list[tuple[str, Any, Any]]:
    """``(label, mask tensor, mask's own shape or None)`` per optimizer parameter, matched by name or position."""
    if isinstance(mask, Mapping):
        if pnames is None:
            raise TypeError("a {name: mask} dict needs names= (the model or its named_parameters())")
        return _by_name(mask, None, pnames)
    shapes = getattr(mask, "shapes", None)
    mnames = getattr(mask, "names", None)
    packed = getattr(mask, "packed", mask)
    if isinstance(packed, Tensor) or not isinstance(packed, Sequence):
        raise TypeError("mask must be a SaliencyMask, a {name: mask} dict or a list of tensors, one per parameter")
    if mnames is not None and pnames is not None:
        return _by_name(dict(zip(mnames, packed)), dict(zip(mnames, shapes)), pnames)
    if len(packed) != len(params):
        raise ValueError(f"mask has {len(packed)} entries but the optimizer has {len(params)} parameters")
    labels = [f"mask[{n!r}]" for n in mnames] if mnames is not None else [f"mask[{i}]" for i in range(len(packed))]
    return list(zip(labels, packed, shapes if shapes is not None else [None] * len(packed)))


def _by_name(masks: Mapping[str, Any], shapes: Mapping[str, Any] | None, pnames: list[str]) -> list[tuple]:
    unknown = [n for n in masks if n not in set(pnames)]
    if unknown:
        raise ValueError(f"mask names {unknown} are not parameters of the optimizer")
    missing = [n for n in pnames if n not in masks]
    if missing:
        raise ValueError(f"mask has no entry for parameter(s) {missing}")
    return [(f"mask[{n!r}]", masks[n], None if shapes is None else shapes[n]) for n in pnames]


def _packed_mask(label: str, m: Any, shape: Any, p: Tensor, pname: str) -> Tensor:
    """``m`` as the contiguous packed mask of ``p`` (logical element order), checked against ``p``."""
    if not isinstance(m, Tensor):
        raise TypeError(f"{label} must be a tensor, got {type(m).__name__}")
    if shape is not None and torch.Size(shape) != p.shape:
        raise ValueError(f"{label} has shape {tuple(shape)} but {pname} has {tuple(p.shape)}")
    if m.dtype == torch.bool:
        if m.shape != p.shape:
            raise ValueError(f"{label} has shape {tuple(m.shape)} but {pname} has {tuple(p.shape)}")
        m = ops.pack_bits(m.contiguous())
    elif m.dtype != torch.uint8:
        raise TypeError(f"{label} must be bit-packed uint8 or bool, got {m.dtype}")
    elif m.numel() != ops.packed_numel(p.numel()):
        raise ValueError(
            f"{label} has {m.numel()} bytes but {pname} ({p.numel()} elements) needs {ops.packed_numel(p.numel())}"
        )
    return m.reshape(-1).to(p.device).contiguous()


def is_dense_non_overlapping(t: Tensor) -> bool:
    """True when ``t``'s elements fill its storage span exactly once in some dimension order
    (contiguous, channels_last, transposed; not expanded or sliced with gaps)."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class ContiguousWork:
    """Contiguous working copies of a step's non-contiguous parameters (channels_last, transposed).

    The fused ops read and write flat memory in logical order, as every operand they get
    (gradients made contiguous, state, masks) is laid out; a parameter stored in another order is
    copied in, stepped, and copied back (:meth:`write_back`). Element-wise rules give the same
    numbers as on the parameter itself.
    """

    def __init__(self, params: Iterable[Tensor]) -> None:
        self.work: dict[Tensor, Tensor] = {}
        for i, p in enumerate(params):
            if p.is_contiguous():
                continue
            if not is_dense_non_overlapping(p):
                raise ValueError(
                    f"parameter {i} (shape {tuple(p.shape)}, stride {p.stride()}) is neither dense nor "
                    "non-overlapping: fastclu optimizers need parameters that own their memory"
                )
            self.work[p] = p.contiguous()

    def __call__(self, ts: Iterable[Tensor]) -> list[Tensor]:
        """The working tensor of each parameter (itself when contiguous)."""
        return [self.work.get(t, t) for t in ts]

    def write_back(self) -> None:
        for p, w in self.work.items():
            p.copy_(w)


class RoleOptimizer(Optimizer):
    """Base of fastclu's drop-in optimizers (see the module docstring); subclasses set ``_rule``."""

    _rule = "sgd"
    _step_supports_amp_scaling = True
    # Per-parameter float state: kept in state_dtype(p), whatever dtype a loaded state_dict had.
    _buffer_keys: tuple[str, ...] = ()
    _extra_group_keys: ClassVar[dict[str, Any]] = {"mask_mode": None, "mask_roles": None, "penalty": 0.0}

    def __init__(self, params: Any, defaults: dict[str, Any], backend: str | None = None) -> None:
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
        if backend is not None and backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be None, 'auto' or one of {list(BACKENDS)}, got {backend!r}")
        super().__init__(params, {**defaults, **self._extra_group_keys})
        self.backend = backend

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, then the new group's parameters and hyper-parameters are
        checked (dense real floating-point tensors; finite, in-range values, device scalars
        included); a refused group is not added."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for i, p in enumerate(group["params"]):
                if p.dtype not in _PARAM_DTYPES + _complex.COMPLEX_DTYPES:  # complex: as real views
                    raise TypeError(
                        f"param_groups[{len(self.param_groups) - 1}]['params'][{i}] has dtype {p.dtype}; "
                        f"fastclu optimizers take {[str(d) for d in _PARAM_DTYPES + _complex.COMPLEX_DTYPES]} "
                        "parameters"
                    )
            self._check_extra_group_keys(f"param_groups[{len(self.param_groups) - 1}]", group)
            self._check_group(group, sync_ok=True)
            _numpy_to_float_(group)
        except BaseException:
            self.param_groups.pop()
            raise

    def __getstate__(self) -> dict[str, Any]:
        # torch's keeps defaults, state and param_groups only: the backend must survive
        # deepcopy and pickling too.
        return {**super().__getstate__(), "backend": self.__dict__.get("backend")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in self._extra_group_keys.items():
                group.setdefault(k, v)
        self.__dict__.setdefault("backend", None)

    # ------------------------------------------------------------------ helpers
    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _check_group(self, group: dict[str, Any], sync_ok: bool = False) -> None:
        """Subclasses validate a param group's hyper-parameters (groups may be edited by users).

        Called with ``sync_ok=True`` where a group is set (constructor, ``add_param_group``,
        ``load_state_dict``) and ``False`` at every step, where a hyper-parameter held in an
        accelerator tensor is trusted (reading it would sync the host each step).
        """

    # ------------------------------------------------------------------ roles
    def stash(self, role: str) -> None:
        """Keep every parameter's current ``.grad`` under ``role`` (no copy) and set ``.grad`` to None.

        The next backward then fills a fresh ``.grad``. Stashing the same role twice before a
        step accumulates (like repeated backwards). Stashed roles are consumed by :meth:`step`
        (and saved by :meth:`state_dict`); ``zero_grad`` leaves them alone, :meth:`clear_stash`
        drops them. Under AMP, scale every role's loss with the same ``GradScaler`` and do not
        call ``scaler.unscale_`` (it only unscales ``.grad``): use ``step(clip=...)`` instead.
        """
        if not isinstance(role, str) or not role:
            raise TypeError(f"role must be a non-empty str, got {role!r}")
        if role == GRAD:
            raise ValueError(f"role {GRAD!r} names the live .grad and cannot be stashed")
        params = [p for p in self._params() if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise SparseGradientError("fastclu optimizers do not support sparse gradients")
        key = STASH + role
        for p in params:
            st = self.state[p]
            if key in st:
                st[key].add_(p.grad)
            else:
                st[key] = p.grad
            p.grad = None

    def stashed_roles(self) -> list[str]:
        """Names of the roles currently stashed (on any parameter)."""
        names: dict[str, None] = {}
        for st in self.state.values():
            for k in st:
                if isinstance(k, str) and k.startswith(STASH):
                    names[k[len(STASH) :]] = None
        return list(names)

    def clear_stash(self, role: str | None = None) -> None:
        """Drop the stashed gradients of ``role`` (all roles when None)."""
        for p in list(self.state):
            st = self.state[p]
            keys = [k for k in st if isinstance(k, str) and k.startswith(STASH)]
            for k in keys:
                if role is None or k == STASH + role:
                    del st[k]
            if keys and not st:
                del self.state[p]

    # ------------------------------------------------------------------ mask
    def set_mask(
        self,
        mask: Any,
        mode: str = "grad",
        roles: Sequence[str] | None = None,
        *,
        names: Any = None,
    ) -> None:
        """Install a saliency mask over all parameters (param-group order), or remove it (``mask=None``).

        Args:
            mask: a :class:`fastclu.saliency.SaliencyMask`; a list (one entry per parameter) of
                bit-packed ``uint8[ceil(numel/8)]`` tensors (:mod:`fastclu.ops.bits` layout, logical
                element order) or bool tensors shaped like the parameter; or a ``{parameter name:
                mask}`` dict of either (needs ``names``).
            mode: ``"grad"``: the mask gates only the gradients of ``roles``; momentum and weight
                decay still move every weight. ``"update"``: where the mask is 0, neither the
                weight nor its optimizer state moves.
            roles: role names the mask gates in ``"grad"`` mode (``"grad"`` is the live
                ``.grad``); None gates every role.
            names: the optimizer's parameter names: ``model`` (an ``nn.Module``: its
                ``named_parameters()``), a ``{name: parameter}`` mapping, or a list of names in
                param-group order. With names, a dict mask or a named SaliencyMask is matched by
                name (missing or unknown names are errors); without, a mask is matched by position.
        Every entry is checked (count, shape, size) before any state changes; errors name the
        parameter.
        """
        params = self._params()
        if mask is None:
            for p in params:
                if p in self.state:
                    self.state[p].pop("mask", None)
            for g in self.param_groups:
                g["mask_mode"], g["mask_roles"] = None, None
            return
        if mode not in ("grad", "update"):
            raise ValueError(f"mode must be 'grad' or 'update', got {mode!r}")
        if roles is not None:
            if isinstance(roles, str) or not all(isinstance(r, str) for r in roles):
                raise TypeError("roles must be a list of role names (str) or None")
            roles = list(roles)
        pnames = _param_names(names, params)
        labels = pnames or [f"parameter {i}" for i in range(len(params))]
        # a DTensor parameter's mask covers its local shard
        out = [_packed_mask(label, distributed.local(m), shape, distributed.local(p), pname)
               for (label, m, shape), p, pname in zip(_mask_entries(mask, params, pnames), params, labels)]  # fmt: skip
        for p, m in zip(params, out):
            self.state[p]["mask"] = m
        for g in self.param_groups:
            g["mask_mode"], g["mask_roles"] = mode, roles

    # ------------------------------------------------------------------ anchor penalty
    def set_anchor(
        self,
        importance: Sequence[Tensor] | None,
        lam: float = 1.0,
        anchor: Sequence[Tensor] | None = None,
    ) -> None:
        """EWC-style preserve term fused into every step: ``g += lam * importance * (theta - anchor)``.

        Args:
            importance: per-parameter importances Omega (shapes of the parameters; e.g. a Fisher
                from :func:`fastclu.saliency.fisher`), or None to remove the penalty.
            lam: penalty strength (finite, >= 0; a 0-d tensor is read once, here).
            anchor: the weights to preserve; default a copy of the current weights.
        Stored in fp32 (fp64 for fp64 parameters) in the optimizer state.
        """
        params = self._params()
        if importance is None:
            for p in params:
                if p in self.state:
                    self.state[p].pop("importance", None)
                    self.state[p].pop("anchor", None)
            for g in self.param_groups:
                g["penalty"] = 0.0
            return
        lam_f = float(_as_scalar("lam", lam, lo=0.0, sync_ok=True))
        anchor = [p.detach() for p in params] if anchor is None else anchor
        for name, xs in (("importance", importance), ("anchor", anchor)):
            if isinstance(xs, Tensor) or not isinstance(xs, Sequence):
                raise TypeError(f"{name} must be a list of tensors, one per parameter")
            if len(xs) != len(params):
                raise ValueError(f"{name} has {len(xs)} tensors but the optimizer has {len(params)} parameters")
            for i, (x, p) in enumerate(zip(xs, params)):
                _complex.check_like(f"{name}[{i}]", x, p)  # complex: complex for complex parameters
                if x.shape != p.shape:
                    raise ValueError(f"{name}[{i}] has shape {tuple(x.shape)} but parameter {i} has {tuple(p.shape)}")
                if x.device.type != "meta" and not bool(torch.isfinite(x).all()):  # set-time: one sync
                    raise ValueError(f"{name}[{i}] holds NaN or inf")
        for p, w, a in zip(params, importance, anchor):
            dt = state_dtype(p)
            self.state[p]["importance"] = w.detach().to(p.device, dt, copy=True).contiguous()
            self.state[p]["anchor"] = a.detach().to(p.device, dt, copy=True).contiguous()
        for g in self.param_groups:
            g["penalty"] = lam_f

    # ------------------------------------------------------------------ state_dict
    def _cast_state(self, p: Tensor, key: Any, v: Any) -> Any:
        if key == "step" and isinstance(v, (int, float)):  # old torch checkpoints kept a Python number
            return torch.tensor(float(v), dtype=torch.float32, device=p.device)
        if not isinstance(v, Tensor):
            return v
        if key == "step":
            return v.detach().to(device=p.device, dtype=torch.float32, copy=True)
        if isinstance(key, str) and key.startswith(STASH):
            return v.detach().to(device=p.device, dtype=p.dtype, copy=True)
        if key in self._buffer_keys or key in ("importance", "anchor"):
            return v.detach().to(device=p.device, dtype=state_dtype(p), copy=True)
        return v.detach().to(device=p.device, copy=True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, validated in full before anything changes.

        Pre-hooks run first (their returned dict is the one loaded), then the whole dict is
        checked against this optimizer: the number of groups and of parameters per group, every
        group's hyper-parameters (present and valid: ``lr``... as the constructor checks them,
        ``mask_mode`` in {None, 'grad', 'update'}, ``mask_roles``, ``penalty``), and every
        parameter's state (known keys only: no AdamW state into SGD; buffers, anchors and
        stashes shaped like the parameter; packed masks of the right size). Only then is the new
        state built (float state stays fp32, where torch would cast it to the parameter's dtype)
        and swapped in as a whole, and the post-hooks run. State entries not keyed by a
        parameter id are kept as they are (as torch does).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict has no {key!r} entry")
        groups, id_map = self._parse_groups(state_dict["param_groups"])
        saved_state = state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise TypeError(f"state_dict['state'] must be a dict, got {type(saved_state).__name__}")
        state: defaultdict[Any, Any] = defaultdict(dict)
        for pid, entry in saved_state.items():
            if pid in id_map:
                state[id_map[pid]] = self._parse_state_entry(pid, id_map[pid], entry)
            else:
                state[pid] = entry
        self.__setstate__({"state": state, "param_groups": groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _parse_groups(self, saved_groups: object) -> tuple[list[dict[str, Any]], dict[Any, Tensor]]:
        """Validated copies of the saved groups (with this optimizer's params) and saved id -> param."""
        if not isinstance(saved_groups, Sequence) or isinstance(saved_groups, (str, bytes)):
            raise TypeError("state_dict['param_groups'] must be a list of dicts")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} parameter groups but the optimizer has {len(self.param_groups)}"
            )
        groups, id_map = [], {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), Sequence):
                raise TypeError(f"state_dict['param_groups'][{gi}] must be a dict with a 'params' list")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"state_dict['param_groups'][{gi}] has {len(saved['params'])} parameters "
                    f"but the optimizer's group {gi} has {len(group['params'])}"
                )
            missing = [k for k in self._required_group_keys() if k not in saved]
            if missing:
                raise ValueError(f"state_dict['param_groups'][{gi}] lacks {missing}")
            new = {**copy.deepcopy({k: v for k, v in saved.items() if k != "params"}), "params": group["params"]}
            if "param_names" in group and "param_names" not in new:
                new["param_names"] = group["param_names"]
            for k, v in self._extra_group_keys.items():
                new.setdefault(k, v)
            self._check_extra_group_keys(f"state_dict['param_groups'][{gi}]", new)
            self._check_group(new, sync_ok=True)
            for pid, p in zip(saved["params"], group["params"]):
                if pid in id_map:
                    raise ValueError(f"state_dict['param_groups'] lists parameter id {pid!r} twice")
                id_map[pid] = p
            groups.append(new)
        return groups, id_map

    def _required_group_keys(self) -> tuple[str, ...]:
        return tuple(k for k in ("lr", "momentum", "dampening", "weight_decay", "betas", "eps") if k in self.defaults)

    @staticmethod
    def _check_extra_group_keys(name: str, group: Mapping[str, Any]) -> None:
        if group["mask_mode"] not in (None, "grad", "update"):
            raise ValueError(f"{name}['mask_mode'] must be None, 'grad' or 'update', got {group['mask_mode']!r}")
        roles = group["mask_roles"]
        if roles is not None and (
            isinstance(roles, str) or not isinstance(roles, Sequence) or not all(isinstance(r, str) for r in roles)
        ):
            raise TypeError(f"{name}['mask_roles'] must be None or a list of role names, got {roles!r}")
        _as_scalar(f"{name}['penalty']", group["penalty"], lo=0.0)

    def _own_state_keys(self) -> set[str]:
        return set(self._buffer_keys) | ({"step"} if "exp_avg" in self._buffer_keys else set())

    def _parse_state_entry(self, pid: Any, p: Tensor, entry: object) -> dict[Any, Any]:
        """The state of one parameter, checked against ``p`` and cast (copies; nothing changes)."""
        name = f"state_dict['state'][{pid!r}]"
        if not isinstance(entry, Mapping):
            raise TypeError(f"{name} must be a dict, got {type(entry).__name__}")
        foreign = [k for k in entry if k in _KNOWN_BUFFERS and k not in self._own_state_keys()]
        if foreign:
            raise ValueError(
                f"{name} holds {foreign}, which {type(self).__name__} does not use (state of another optimizer?)"
            )
        for k, v in entry.items():
            _check_state_value(f"{name}[{k!r}]", k, v, p, self._own_state_keys())
        return {k: self._cast_state(p, k, v) for k, v in entry.items()}

    # ------------------------------------------------------------------ step
    def _init_state(self, group: dict[str, Any], p: Tensor, st: dict[str, Any]) -> bool:
        """Create missing state for ``p``; return True when this is a first step needing ``init_momentum``."""
        raise NotImplementedError

    def _rule_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _state_lists(self, group: dict[str, Any], params: list[Tensor]) -> dict[str, list[Tensor]]:
        raise NotImplementedError

    def _needs_init(self, group: dict[str, Any], st: dict[str, Any]) -> bool:
        raise NotImplementedError

    @staticmethod
    def _parse_combine(combine: Mapping[str, Any] | None) -> dict[str, float | Tensor]:
        if combine is None:
            return {GRAD: 1.0}
        if not isinstance(combine, Mapping):
            raise TypeError(f"combine must be a dict role -> coefficient, got {type(combine).__name__}")
        if not 1 <= len(combine) <= MAX_ROLES:
            raise ValueError(f"combine must name 1 to {MAX_ROLES} roles, got {len(combine)}")
        out = {}
        for role, c in combine.items():
            if not isinstance(role, str) or not role:
                raise TypeError(f"combine keys must be role names (str), got {role!r}")
            out[role] = _as_scalar(f"combine[{role!r}]", c)
        return out

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        combine: Mapping[str, float | Tensor] | None = None,
        clip: float | None = None,
        restore_from: Sequence[Tensor] | None = None,
    ) -> Any:
        """One optimization step, fused with the role combination, mask, clip and penalty.

        Args:
            closure: re-evaluates the model and returns the loss (run with grad enabled).
            combine: role name -> coefficient (float or 0-d tensor). ``"grad"`` is the live
                ``.grad``; other names are stashed roles. Default ``{"grad": 1.0}``: exactly
                torch's step. Stashed roles are consumed (dropped) by the step, named or not.
            clip: bound on the global L2 norm (over all parameters) of the combined, masked
                gradient ``sum_r c_r m_r g_r`` (not of weight decay or the penalty); the scale
                ``min(1, clip / (norm + 1e-6))`` is applied inside the fused update, as
                ``torch.nn.utils.clip_grad_norm_`` would.
            restore_from: one tensor per parameter (param-group order, same shape/device/dtype,
                may be the parameter itself): a fused restore. Every parameter that takes part in
                the step reads its weights from this tensor and writes the result to the
                parameter (also when AMP skips the update: then the parameter is just restored).
                Parameters without any gradient are neither stepped nor restored.
        Returns:
            the closure's loss, or None.

        Validation before anything moves: coefficients and ``clip`` must be finite (``clip > 0``);
        Python numbers and CPU 0-d tensors are checked on every call, 0-d tensors on an
        accelerator are trusted (checking them would sync the host every step). Every group's
        hyper-parameters are re-checked (groups may be edited), with the same rule. Mask role
        names: at a step whose ``combine`` names stashed roles, every role of a ``"grad"``-mode
        mask must be ``"grad"`` or a role this optimizer has seen (in this or an earlier
        ``combine``, or stashed now); a misspelt mask role would otherwise gate nothing. Plain
        steps do not check it (a mask may name a role only later steps use).
        """
        self._check_step_args(combine, clip)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scaler_inf = getattr(self, "found_inf", None)
        with torch.no_grad():
            if scaler_inf is None:
                self._step(combine, clip, restore_from)
                return loss
            # Under GradScaler: skip on a non-finite value in any role the step reads (stashes
            # included), where the mask lets it through; a masked-out inf does not skip the step.
            found_inf = self._amp_found_inf(combine, scaler_inf)
            self.found_inf, self.last_found_inf = found_inf, found_inf
            self._amp_checked = found_inf is not scaler_inf  # stashes already checked, masks respected
            try:
                self._step(combine, clip, restore_from)
            finally:
                self.found_inf, self._amp_checked = scaler_inf, False
            self._unscale_grads_in_place(found_inf)
        return loss

    def _amp_found_inf(self, combine: Mapping[str, Any] | None, scaler_inf: Tensor) -> Tensor:
        """GradScaler's ``found_inf`` recomputed over what the step reads, masks respected.

        Without a mask and without stashed roles, GradScaler's own check over ``.grad`` is
        exactly that and is returned as is; otherwise one pass over the role gradients.
        """
        masked = any(g.get("mask_mode") is not None for g in self.param_groups)
        roles = list(self._parse_combine(combine))
        if not masked and roles == [GRAD]:
            return scaler_inf
        dev = scaler_inf.device
        bad = torch.zeros((), dtype=torch.float32, device=dev)
        for group in self.param_groups:
            mode, gated = group.get("mask_mode"), group.get("mask_roles")
            for p in group["params"]:
                st = self.state.get(p, {})
                mask = st.get("mask") if mode is not None else None
                for r in roles:
                    g = p.grad if r == GRAD else st.get(STASH + r)
                    if g is None:
                        continue
                    nonfinite = ~torch.isfinite(g.detach()).reshape(-1)
                    if mask is not None and (mode == "update" or gated is None or r in gated):
                        nonfinite = nonfinite & ops.unpack_bits(mask, p.numel())
                    bad = bad + nonfinite.any().to(dev, torch.float32)
        return (bad > 0).to(scaler_inf.dtype)

    def _unscale_grads_in_place(self, found_inf: Tensor) -> None:
        """Leave ``.grad`` unscaled after ``scaler.step``, as torch's fused optimizers do
        (untouched when the step was skipped, as theirs)."""
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None:
            return
        by_dev: dict[torch.device, list[Tensor]] = {}
        for p in self._params():
            if p.grad is not None:
                by_dev.setdefault(p.grad.device, []).append(p.grad)
        for dev, grads in by_dev.items():
            gs = grad_scale.to(dev).reshape(())
            divisor = torch.where(found_inf.to(dev).reshape(()) > 0, torch.ones_like(gs), gs)
            torch._foreach_div_(grads, divisor)

    def _check_step_args(self, combine: Mapping[str, Any] | None, clip: object) -> None:
        coeffs = self._parse_combine(combine)
        if clip is not None:
            _as_scalar("clip", clip, lo=0.0, lo_open=True)
        for gi, group in enumerate(self.param_groups):
            if group.get("mask_mode") not in (None, "grad", "update"):
                raise ValueError(f"param_groups[{gi}]['mask_mode'] must be None, 'grad' or 'update'")
            self._check_group(group)
            _numpy_to_float_(group)
        roles = [r for r in coeffs if r != GRAD]
        if not roles:
            return
        seen = self.__dict__.setdefault("_seen_roles", set())
        seen.update(roles)
        seen.update(self.stashed_roles())
        for gi, group in enumerate(self.param_groups):
            if group.get("mask_mode") == "grad" and group.get("mask_roles") is not None:
                unknown = [r for r in group["mask_roles"] if r != GRAD and r not in seen]
                if unknown:
                    raise ValueError(
                        f"the mask of param_groups[{gi}] gates role(s) {unknown}, which no step has named; "
                        f"known roles: {sorted({GRAD, *seen})} (misspelt in set_mask(roles=...)?)"
                    )

    def _check_restore_from(self, restore_from: object) -> dict[Tensor, Tensor] | None:
        if restore_from is None:
            return None
        params = self._params()
        if isinstance(restore_from, Tensor) or not isinstance(restore_from, Sequence):
            raise TypeError("restore_from must be a list of tensors, one per parameter")
        if len(restore_from) != len(params):
            raise ValueError(
                f"restore_from has {len(restore_from)} tensors but the optimizer has {len(params)} parameters"
            )
        for i, (r, p) in enumerate(zip(restore_from, params)):
            if not isinstance(r, Tensor):
                raise TypeError(f"restore_from[{i}] must be a tensor, got {type(r).__name__}")
            if r.shape != p.shape or r.device != p.device or r.dtype != p.dtype:
                raise ValueError(f"restore_from[{i}] must match parameter {i} in shape, device and dtype")
            if not r.is_contiguous() and r is not p:
                raise ValueError(f"restore_from[{i}] must be contiguous")
        return dict(zip(params, restore_from))

    def _step(self, combine: Mapping[str, Any] | None, clip: float | None, restore_from: object = None) -> None:
        coeffs = self._parse_combine(combine)
        restore = self._check_restore_from(restore_from)
        clip = _check_clip(clip)
        roles = list(coeffs)
        keys = [None if r == GRAD else STASH + r for r in roles]
        self._check_roles_stashed(roles)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and not isinstance(found_inf, Tensor):
            found_inf = torch.tensor(float(found_inf))

        # Pass 1: validate everything before anything is modified.
        plan = []  # (group, param, [role grads or None])
        for group in self.param_groups:
            self._check_group(group)
            for p in group["params"]:
                st = self.state.get(p, {})
                gs = [p.grad if k is None else st.get(k) for k in keys]
                if all(g is None for g in gs):
                    continue
                for g in gs:
                    if g is not None and (g.is_sparse or g.layout != torch.strided):
                        raise SparseGradientError("fastclu optimizers do not support sparse gradients")
                plan.append((group, p, gs))
        work = ContiguousWork(p for _, p, _ in plan)  # channels_last / transposed parameters
        if not plan:
            self.clear_stash()
            return

        if not getattr(self, "_amp_checked", False):  # the wrappers' AMP path checked every role already
            found_inf = _with_stash_finiteness(found_inf, plan, keys)
        if self._skips_first_step(plan, found_inf, restore):
            self.clear_stash()
            return
        buckets = self._buckets(plan, len(roles))

        def gating(b: dict[str, Any]) -> tuple[list[Tensor] | None, list[bool]]:
            return self._gating(b, roles)

        scale: float | Tensor = 1.0
        if clip is not None:
            scale = self._clip_scale(buckets.values(), gating, coeffs, clip, grad_scale)
        for b in buckets.values():
            self._combine_bucket(b, gating(b), coeffs, scale, grad_scale, found_inf, restore, work)
        work.write_back()
        self.clear_stash()

    def _check_roles_stashed(self, roles: list[str]) -> None:
        stashed = self.stashed_roles()
        unknown = [r for r in roles if r != GRAD and r not in stashed]
        if unknown:
            # A misspelt role would otherwise count as zero and its step would drop the real stash.
            raise ValueError(f"combine names role(s) {unknown} but nothing is stashed under them; stashed: {stashed}")

    def _skips_first_step(self, plan: list, found_inf: Tensor | None, restore: dict | None) -> bool:
        """A skipped first step must not create state that would change the next one
        (one host sync, on first steps under AMP only); the fused restore still happens."""
        first = found_inf is not None and any(self._needs_init(grp, self.state.get(p, {})) for grp, p, _ in plan)
        if not (first and float(found_inf.reshape(())) != 0.0):
            return False
        if restore is not None:
            by_key: dict[tuple, list[Tensor]] = {}
            for _, p, _ in plan:
                if restore[p] is not p:
                    by_key.setdefault((p.device, p.dtype), []).append(p)
            for ps in by_key.values():
                _complex.restore_(ps, [restore[p] for p in ps], backend=self.backend)
        return True

    def _buckets(self, plan: list, n_roles: int) -> dict[tuple, dict[str, Any]]:
        """Pass 2: state, and one bucket per (group, device, dtype, state layout): one launch each."""
        buckets: dict[tuple, dict[str, Any]] = {}
        for group, p, gs in plan:
            init = self._init_state(group, p, self.state.setdefault(p, {}))
            st = self.state[p]
            if not st:
                del self.state[p]  # torch keeps no entry for a stateless parameter (SGD without momentum)
            has_mask = group["mask_mode"] is not None and "mask" in st
            has_pen = group["penalty"] != 0 and "importance" in st and "anchor" in st
            key = (id(group), p.device, p.dtype, init, has_mask, has_pen)
            b = buckets.setdefault(key, {"group": group, "init": init, "mask": has_mask, "pen": has_pen,
                                         "params": [], "grads": [[] for _ in range(n_roles)]})  # fmt: skip
            b["params"].append(p)
            for r, g in enumerate(gs):
                if g is None:
                    g = torch.zeros_like(p)
                b["grads"][r].append(distributed.local(g if g.is_contiguous() else g.contiguous()))
        return buckets

    def _gating(self, b: dict[str, Any], roles: list[str]) -> tuple[list[Tensor] | None, list[bool]]:
        """The bucket's masks (None: no gating) and which roles they gate."""
        if not b["mask"]:
            return None, [False] * len(roles)
        group = b["group"]
        if group["mask_mode"] == "update":
            flags = [True] * len(roles)
        else:
            gated = group["mask_roles"]
            flags = [gated is None or r in gated for r in roles]
        if not any(flags) and group["mask_mode"] == "grad":
            return None, flags
        return [self.state[p]["mask"] for p in b["params"]], flags

    def _combine_bucket(
        self,
        b: dict[str, Any],
        gate: tuple[list[Tensor] | None, list[bool]],
        coeffs: dict[str, float | Tensor],
        scale: float | Tensor,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        restore: dict | None,
        work: ContiguousWork,
    ) -> None:
        """One fused :func:`fastclu.ops.combine_step_` over the bucket."""
        group = b["group"]
        params = b["params"]
        mask, flags = gate
        mode = group["mask_mode"] if mask is not None else "grad"
        pen = {}
        if b["pen"]:
            pen = {"penalty": group["penalty"], "importance": [self.state[p]["importance"] for p in params],
                   "anchor": [self.state[p]["anchor"] for p in params]}  # fmt: skip
            pen = {k: v if k == "penalty" else distributed.local_list(v) for k, v in pen.items()}
        dev = params[0].device
        sc = scale.to(dev) if isinstance(scale, Tensor) else scale
        # DTensor (FSDP2) parameters, their grads and state step as local shards; non-contiguous
        # parameters through their contiguous working copies
        states = {k: distributed.local_list(v) for k, v in self._state_lists(group, params).items()}
        _complex.combine_step_(  # ops.combine_step_, complex parameters as real views
            distributed.local_list(work(params)), b["grads"], states, rule=self._rule, lr=group["lr"],
            coeffs=[c.to(dev) if isinstance(c, Tensor) and c.device.type != "cpu" else c for c in coeffs.values()],
            scale=sc, mask=mask, masked=flags if mask is not None else None, mask_mode=mode,
            grad_scale=None if grad_scale is None else grad_scale.to(dev),
            found_inf=None if found_inf is None else found_inf.to(dev),
            init_momentum=b["init"], backend=self.backend, **pen, **self._rule_kwargs(group),
            restore_from=None if restore is None else distributed.local_list(work([restore[p] for p in params])),
        )  # fmt: skip

    def _clip_scale(
        self,
        buckets: Iterable[dict[str, Any]],
        gating: Callable,
        coeffs: dict[str, float | Tensor],
        clip: float | Tensor,
        grad_scale: Tensor | None,
    ) -> Tensor:
        """``min(1, clip / (norm + 1e-6))`` with ``norm^2 = c^T G c`` from one gram pass (no host sync)."""
        buckets = list(buckets)
        total: Tensor | None = None
        for b in buckets:
            mask, flags = gating(b)
            g = _complex.gram(b["grads"], mask=mask, masked=flags if mask is not None else None, backend=self.backend)
            total = g.double() if total is None else total + g.to(total.device, torch.float64)
        assert total is not None
        total = distributed.reduce_gram_(total, [p for b in buckets for p in b["params"]])
        dev = total.device
        c = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(dev).reshape(()) for v in coeffs.values()])
        norm = (c @ total @ c).clamp_min(0.0).sqrt()
        if grad_scale is not None:
            norm = norm / grad_scale.to(dev, torch.float64).reshape(())
        clip_t = torch.as_tensor(clip, dtype=torch.float64).to(dev)
        return (clip_t / (norm + 1e-6)).clamp(max=1.0).to(torch.float32)


def _check_clip(clip: object) -> float | Tensor | None:
    if clip is None:
        return None
    clip = _as_scalar("clip", clip)
    if isinstance(clip, float) and not clip > 0.0:
        raise ValueError(f"clip must be > 0, got {clip}")
    return clip


def _with_stash_finiteness(found_inf: Tensor | None, plan: list, keys: list[str | None]) -> Tensor | None:
    """GradScaler only checks ``.grad``; a non-finite stashed role must skip the step too."""
    stash_tensors = [g for _, _, gs in plan for k, g in zip(keys, gs) if k is not None and g is not None]
    if found_inf is None or not stash_tensors:
        return found_inf
    bad = torch.stack([(~torch.isfinite(g)).any().to(found_inf.device) for g in stash_tensors]).any()
    return found_inf.reshape(()).float() + bad.float()
