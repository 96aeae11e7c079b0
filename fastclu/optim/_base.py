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
from fastclu._registry import BACKENDS, choose, current_backend, device_type, implementation
from fastclu._scalars import check_scalar
from fastclu.ops._table import stable_operands
from fastclu.ops.rules import RULES
from fastclu.optim import _complex
from fastclu.optim._layout import MAX_LAYOUTS, Bucket, Layout, Structure, pick

STASH = "stash."
GRAD = "grad"
MAX_ROLES = 4
# Per-parameter buffers of every update rule (fastclu's and torch's SGD / AdamW, CLASSP): one
# optimizer's state must not load into another.
_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KNOWN_BUFFERS = frozenset(k for r in RULES.values() for k in r.state)


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
        # stash key -> (structure, stashed tensors aligned with its params, positions holding one);
        # None: unknown (a loaded state_dict), found by a scan
        self._stash_holders: dict[str, tuple[Structure, list, list[int]]] | None = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, then the new group's parameters and hyper-parameters are
        checked (dense real floating-point tensors; finite, in-range values, device scalars
        included); a refused group is not added."""
        super().add_param_group(param_group)
        self.invalidate_layout()
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
        # new groups and state: layouts rebuilt, group checks redone, stashes found by a scan
        self.invalidate_layout()
        self.__dict__["_checked_groups"] = {}
        self.__dict__["_stash_holders"] = None

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
        struct = self._structure(check_storage=False)
        grads = [p.grad for p in struct.params]
        pos = [i for i, g in enumerate(grads) if g is not None]
        if not all(map(Tensor.is_contiguous, [grads[i] for i in pos])) and any(grads[i].is_sparse for i in pos):
            raise SparseGradientError("fastclu optimizers do not support sparse gradients")
        key = STASH + role
        holders = self.__dict__.get("_stash_holders")
        entry = None if holders is None else holders.get(key)
        if entry is not None and entry[0] is not struct:  # stashed before the parameters changed
            self.__dict__["_stash_holders"] = holders = entry = None
        if holders is not None and entry is None:
            entry = holders[key] = (struct, [None] * len(struct.params), [])
        dicts = self._state_dicts(struct)
        for i in pos:
            p, g = struct.params[i], grads[i]
            st = dicts[i]
            if st is None:
                st = dicts[i] = self.state[p]
            held = st.get(key)
            if held is None:
                st[key] = g
                if entry is not None:
                    entry[1][i] = g
                    entry[2].append(i)
            else:
                held.add_(g)
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
        holders = self.__dict__.get("_stash_holders")
        if role is None:
            self.__dict__["_stash_holders"] = {}
        elif holders is not None:
            holders.pop(STASH + role, None)
        s = self.__dict__.get("_struct")
        if s is not None:
            s.dicts = None  # entries may have been deleted

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
            self.invalidate_layout()
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
        self.invalidate_layout()

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
            self.invalidate_layout()
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
        self.invalidate_layout()

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
        return set(RULES[self._rule].state)

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
        with torch.no_grad():
            found_inf = self._step(combine, clip, restore_from)
            if found_inf is not None:  # under GradScaler
                self._unscale_grads_in_place(found_inf)
        return loss

    def _unscale_grads_in_place(self, found_inf: Tensor) -> None:
        """Leave ``.grad`` unscaled after ``scaler.step``, as torch's fused optimizers do
        (untouched when the step was skipped, as theirs)."""
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None:
            return
        by_dev: dict[torch.device, list[Tensor]] = {}
        for g in [p.grad for p in self._structure().params]:
            if g is not None:
                by_dev.setdefault(g.device, []).append(g)
        for dev, grads in by_dev.items():
            divisor = torch.where(found_inf.to(dev).reshape(()) > 0, 1.0, grad_scale.to(dev).reshape(()))
            torch._foreach_div_(grads, divisor)

    def _check_step_args(self, combine: Mapping[str, Any] | None, clip: object) -> None:
        coeffs = self._parse_combine(combine)
        if clip is not None:
            _as_scalar("clip", clip, lo=0.0, lo_open=True)
        for gi, group in enumerate(self.param_groups):
            self._check_group_once(gi, group)
        roles = [r for r in coeffs if r != GRAD]
        if not roles:
            return
        seen = self.__dict__.setdefault("_seen_roles", set())
        seen.update(roles)
        for gi, group in enumerate(self.param_groups):
            if group.get("mask_mode") == "grad" and group.get("mask_roles") is not None:
                unknown = [r for r in group["mask_roles"] if r != GRAD and r not in seen]
                if unknown:  # the full scan of the state only where a role is not known yet
                    seen.update(self.stashed_roles())
                    unknown = [r for r in unknown if r not in seen]
                if unknown:
                    raise ValueError(
                        f"the mask of param_groups[{gi}] gates role(s) {unknown}, which no step has named; "
                        f"known roles: {sorted({GRAD, *seen})} (misspelt in set_mask(roles=...)?)"
                    )

    def _check_group_once(self, gi: int, group: dict[str, Any]) -> None:
        """The group's hyper-parameters checked when they differ from the last checked ones.

        A group is compared by value (numbers, strings, tuples) and by identity (tensors, lists):
        a tensor hyper-parameter is checked when it first appears in the group (where it is set),
        never read again per step, so an LR scheduler's in-place update of a 0-d CUDA lr costs no
        sync. While ``torch.compile`` traces, the checks run without reading tensors.
        """
        if torch.compiler.is_compiling():
            self._check_group_values(gi, group)
            return
        checked = self.__dict__.setdefault("_checked_groups", {})
        sig = _group_signature(group)
        hit = checked.get(gi)
        if hit is not None and hit[0] is group and hit[1] == sig:
            return
        self._check_group_values(gi, group)
        checked[gi] = (group, _group_signature(group))

    def _check_group_values(self, gi: int, group: dict[str, Any]) -> None:
        if group.get("mask_mode") not in (None, "grad", "update"):
            raise ValueError(f"param_groups[{gi}]['mask_mode'] must be None, 'grad' or 'update'")
        self._check_group(group)
        _numpy_to_float_(group)

    def _check_restore_from(self, restore_from: object) -> dict[Tensor, Tensor] | None:
        if restore_from is None:
            return None
        params = self._structure().params
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

    # ------------------------------------------------------------------ layouts (see fastclu.optim._layout)
    def invalidate_layout(self) -> None:
        """Drop the cached step layouts: call after replacing a tensor in ``optimizer.state``
        by hand (everything done through the optimizer's methods is detected)."""
        self.__dict__["_layout_epoch"] = self.__dict__.get("_layout_epoch", 0) + 1
        self.__dict__["_struct"] = None

    def _state_dicts(self, struct: Structure) -> list[dict | None]:
        """Every parameter's state dict (None where it has none), kept on the structure: the step
        then looks no tensor up in ``self.state`` (a Python ``__hash__`` call each)."""
        if struct.dicts is None:
            get = self.state.get
            struct.dicts = [get(p) for p in struct.params]
        return struct.dicts

    def _structure(self, check_storage: bool = True) -> Structure:
        """The flat parameter list and its layouts, rebuilt when groups, state or storage changed."""
        if torch.compiler.is_compiling():  # traced once: the graph keeps what it needs, Dynamo guards it
            return Structure((), self._params(), None)
        sig = (self.__dict__.get("_layout_epoch", 0), id(self.state),
               tuple([(id(g["params"]), len(g["params"])) for g in self.param_groups]))  # fmt: skip
        s = self.__dict__.get("_struct")
        if (
            s is not None
            and s.sig == sig
            and (not check_storage or s.ptrs is None or [p.data_ptr() for p in s.params] == s.ptrs)
        ):
            return s
        params = self._params()
        ptrs = None if distributed.any_dtensor(params) else [p.data_ptr() for p in params]
        s = Structure(sig, params, ptrs)
        self.__dict__["_struct"] = s
        return s

    def _layout_flags(self, group: dict[str, Any]) -> tuple:
        """What of a group decides its buckets and state lists (part of the layout key)."""
        roles = group["mask_roles"]
        return (group["mask_mode"], None if roles is None else tuple(roles), _nonzero(group["penalty"]),
                self._state_flags(group))  # fmt: skip

    def _state_flags(self, group: dict[str, Any]) -> tuple:
        """Subclasses: the group values their ``_state_lists`` depend on (amsgrad, momentum on)."""
        return ()

    def _layout_for(self, struct: Structure, keys: tuple, present: list[list[bool]]) -> Layout | None:
        if torch.compiler.is_compiling():  # not cached: traced once, the graph is the cache
            return self._build_layout(struct, keys, present)
        key = (keys, tuple([tuple(pr) for pr in present]), tuple([self._layout_flags(g) for g in self.param_groups]),
               self.backend, current_backend())  # fmt: skip
        layout = struct.layouts.get(key)
        if layout is None:
            layout = self._build_layout(struct, keys, present)
            if layout is not None and layout.cacheable:
                if len(struct.layouts) >= MAX_LAYOUTS:
                    struct.layouts.clear()
                struct.layouts[key] = layout
        return layout

    def _build_layout(self, struct: Structure, keys: tuple, present: list[list[bool]]) -> Layout | None:
        """Buckets (group, device, dtype, first step, mask, penalty) of the parameters holding any
        role; no state is created here (an AMP-skipped first step must not create any)."""
        taking = [any(col) for col in zip(*present)]
        if not any(taking):
            return None
        buckets: dict[tuple, Bucket] = {}
        pos = 0
        for gi, group in enumerate(self.param_groups):
            pen_on = _nonzero(group["penalty"])
            for i in range(pos, pos + len(group["params"])):
                if not taking[i]:
                    continue
                p = struct.params[i]
                st = self.state.get(p, _EMPTY)
                init = self._needs_init(group, st)
                has_mask = group["mask_mode"] is not None and "mask" in st
                has_pen = pen_on and "importance" in st and "anchor" in st
                k = (gi, p.device, p.dtype, init, has_mask, has_pen)
                b = buckets.get(k)
                if b is None:
                    b = buckets[k] = Bucket(group, [], [], init, has_mask, has_pen, *self._backend_of(p))
                    b.complex = p.is_complex()
                b.idx.append(i)
                b.params.append(p)
            pos += len(group["params"])
        for b in buckets.values():
            self._describe_bucket(b, struct, keys, present)
        params = [p for b in buckets.values() for p in b.params]
        return Layout(list(buckets.values()), distributed.any_dtensor(params),
                      cacheable=not any(b.init for b in buckets.values()), struct=struct)  # fmt: skip

    def _backend_of(self, p: Tensor) -> tuple[str, Callable, Callable]:
        """The backend that runs a bucket of ``p``'s dtype and device, and its combine / gram
        implementations (fp64 goes to the reference, as :mod:`fastclu.ops` routes it)."""
        name = choose("combine_step_", self.backend, device_type([p]))
        if p.dtype in (torch.float64, torch.complex128):  # complex128: fp64 real views
            name = "reference"
        return (
            name,
            implementation("combine_step_", name),
            implementation("gram", choose("gram", name, device_type([p]))),
        )

    def _describe_bucket(self, b: Bucket, struct: Structure, keys: tuple, present: list[list[bool]]) -> None:
        b.identity = len(b.idx) == len(struct.params)
        b.missing = [[j for j, i in enumerate(b.idx) if not pr[i]] for pr in present]
        if any(p.numel() == 0 for p in b.params):
            b.nonempty = [j for j, p in enumerate(b.params) if p.numel()]
        b.noncontig = [j for j, p in enumerate(b.params) if not p.is_contiguous()]
        ContiguousWork(b.params[j] for j in b.noncontig)  # refuses parameters with gaps or overlaps, here
        group = b.group
        roles = [GRAD if k is None else k[len(STASH) :] for k in keys]
        if group["mask_mode"] == "update":
            flags = [True] * len(roles)
        else:
            gated = group["mask_roles"]
            flags = [gated is None or r in gated for r in roles]
        if b.has_mask and (any(flags) or group["mask_mode"] == "update"):
            b.masks = distributed.local_list([self.state[p]["mask"] for p in b.params])
            if b.complex:  # complex: one bit per complex element -> two bits per real-view element
                b.masks = _complex.real_masks(b.masks, b.params)
            b.flags, b.mode = flags, group["mask_mode"]
        else:
            b.flags = [False] * len(roles)

    def _finish_layout(self, layout: Layout) -> None:
        """State for every parameter of the layout, and the kernel views of parameters and state."""
        for b in layout.buckets:
            group = b.group
            for p in b.params:
                st = self.state.setdefault(p, {})
                self._init_state(group, p, st)
                if not st:
                    del self.state[p]  # torch keeps no entry for a stateless parameter (SGD without momentum)
        if layout.struct is not None:
            layout.struct.dicts = None  # entries created
        for b in layout.buckets:
            group = b.group
            b.kparams, b.states = self._kernel_tensors(b.params, self._state_lists(group, b.params))
            if b.has_pen:
                b.pen = {k: _complex.real_list(distributed.local_list([self.state[p][k] for p in b.params]))
                         for k in ("importance", "anchor")}  # fmt: skip
        layout.ready = True

    @staticmethod
    def _kernel_tensors(
        params: list[Tensor], states: dict[str, list[Tensor]]
    ) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """The tensors the kernels see for the optimizer's parameters and state lists: the one place
        that maps one to the other (DTensor parameters step as their local shards, complex ones as
        real views; step counters stay as they are)."""
        real = _complex.real_list
        return real(distributed.local_list(params)), {
            k: distributed.local_list(v) if k == "step" else real(distributed.local_list(v)) for k, v in states.items()
        }

    # ------------------------------------------------------------------ the step
    def _role_lists(self, struct: Structure, keys: tuple) -> list[list[Tensor | None]]:
        """Per role, its tensor for every parameter (None where it has none)."""
        params = struct.params
        holders = self.__dict__.get("_stash_holders")
        out = []
        for k in keys:
            if k is None:
                out.append([p.grad for p in params])
                continue
            entry = None if holders is None else holders.get(k)
            if entry is not None and entry[0] is struct:
                out.append(entry[1])
            elif holders is not None and entry is None:
                out.append([None] * len(params))
            else:
                out.append([st.get(k) if st is not None else None for st in self._state_dicts(struct)])
        return out

    def _bucket_grads(self, b: Bucket, lists: list[list[Tensor | None]], dtensor: bool) -> list[list[Tensor]]:
        """The bucket's role gradients as the kernels read them (dense, contiguous, local shards);
        refuses sparse gradients before anything moves."""
        out = []
        for r, xs in enumerate(lists):
            gs = pick(xs, b)
            if b.missing[r]:
                gs = list(gs)
                for j in b.missing[r]:
                    gs[j] = torch.zeros_like(b.params[j])
            if dtensor:
                gs = distributed.local_list(gs)
            if not all(map(Tensor.is_contiguous, gs)):
                gs = [_dense(g) for g in gs]
            if b.complex:
                gs = _complex.real_list(gs)
            out.append(gs)
        return out

    def _step(
        self, combine: Mapping[str, Any] | None, clip: float | None, restore_from: object = None
    ) -> Tensor | None:
        """The step; returns the ``found_inf`` it used (None outside GradScaler)."""
        coeffs = self._parse_combine(combine)
        restore = self._check_restore_from(restore_from)
        clip = _check_clip(clip)
        roles = list(coeffs)
        keys = tuple(None if r == GRAD else STASH + r for r in roles)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and not isinstance(found_inf, Tensor):
            found_inf = torch.tensor(float(found_inf))
        struct = self._structure()
        lists = self._role_lists(struct, keys)
        present = [[g is not None for g in xs] for xs in lists]
        self._check_roles_stashed(roles, present)
        layout = self._layout_for(struct, keys, present)
        if layout is None:
            self._drop_stashes()
            return found_inf
        grads = [self._bucket_grads(b, lists, layout.dtensor) for b in layout.buckets]
        # The public ops (full validation) on a layout's first step and while tracing; its
        # backend's implementations directly afterwards.
        direct = layout.ready and not torch.compiler.is_compiling()
        grams: dict[int, Tensor] = {}
        if found_inf is not None:
            found_inf = self._amp_found_inf(layout, grads, roles, found_inf, grams, direct)
            self.last_found_inf = found_inf
        if not layout.ready:
            if self._skips_first_step(layout, found_inf, restore):
                self._drop_stashes()
                return found_inf
            self._finish_layout(layout)
        clipping = None
        if clip is not None:
            # A clip that spans one bucket's call whose gram nothing else needs: the step forms it
            # (the reference then takes the norm of the combination it forms, no gram pass).
            own = len(layout.buckets) == 1 and not layout.dtensor and not grams and layout.buckets[0].mode != "update"
            clipping = (None if own else self._clip_gram(layout, grads, grams, direct), clip)
        work = ContiguousWork(b.params[j] for b in layout.buckets for j in b.noncontig)
        for b, gs in zip(layout.buckets, grads):
            self._combine_bucket(b, gs, coeffs, clipping, grad_scale, found_inf, restore, work, layout.dtensor, direct)
        work.write_back()
        self._drop_stashes()
        return found_inf

    def _check_roles_stashed(self, roles: list[str], present: list[list[bool]]) -> None:
        unknown = [r for r, pr in zip(roles, present) if r != GRAD and not any(pr)]
        if unknown:
            # A misspelt role would otherwise count as zero and its step would drop the real stash.
            raise ValueError(
                f"combine names role(s) {unknown} but nothing is stashed under them; stashed: {self.stashed_roles()}"
            )

    def _drop_stashes(self) -> None:
        """Consume every stashed role (the step's end): only the parameters :meth:`stash` touched."""
        holders = self.__dict__.get("_stash_holders")
        if holders is None:  # stashes of unknown origin (a loaded state_dict): one full scan
            self.clear_stash()
            return
        for key, (struct, _, positions) in holders.items():
            dicts = self._state_dicts(struct)
            for i in positions:
                st = dicts[i]
                if st is not None and st.pop(key, None) is not None and not st:
                    del self.state[struct.params[i]]  # torch keeps no entry for a stateless parameter
                    dicts[i] = None
        holders.clear()

    def _skips_first_step(self, layout: Layout, found_inf: Tensor | None, restore: dict | None) -> bool:
        """A skipped first step must not create state that would change the next one
        (one host sync, on first steps under AMP only); the fused restore still happens."""
        first = found_inf is not None and any(b.init for b in layout.buckets)
        if not (first and float(found_inf.reshape(())) != 0.0):
            return False
        if restore is not None:
            by_key: dict[tuple, list[Tensor]] = {}
            for b in layout.buckets:
                for p in b.params:
                    if restore[p] is not p:
                        by_key.setdefault((p.device, p.dtype), []).append(p)
            for ps in by_key.values():
                _complex.restore_(ps, [restore[p] for p in ps], backend=self.backend)
        return True

    def _gram(self, b: Bucket, gs: list[list[Tensor]], direct: bool) -> Tensor:
        if direct:
            with stable_operands(b.tables):  # its mask list is the layout's
                return b.gram(gs, mask=b.masks, masked=b.flags)
        return ops.gram(gs, mask=b.masks, masked=b.flags, backend=self.backend)

    def _amp_found_inf(
        self,
        layout: Layout,
        grads: list[list[list[Tensor]]],
        roles: list[str],
        scaler_inf: Tensor,
        grams: dict[int, Tensor],
        direct: bool,
    ) -> Tensor:
        """GradScaler's ``found_inf`` extended to what the step reads, masks respected, on the device.

        GradScaler checked every ``.grad``: that stands for the live role where no mask gates it.
        Unmasked roles: one ``_foreach_norm(inf)`` per bucket (exact: a max, it cannot overflow).
        Masked roles: the bucket's gram (shared with the clip), whose diagonal ``sum (m g_r)^2`` is
        non-finite where an unmasked element is; a masked-out inf does not reach it. A finite
        input whose squares overflow the fp32 diagonal is told apart by also requiring a
        non-finite element in the role (any, masked or not): only both together skip the step.
        No host sync; a constant number of ATen ops per bucket.
        """
        g_r = roles.index(GRAD) if GRAD in roles else None
        grad_checked = g_r is None or not any(b.masks is not None and b.flags[g_r] for b in layout.buckets)
        dev = scaler_inf.device
        bad: list[Tensor] = []  # 0-d bools
        for bi, (b, gs) in enumerate(zip(layout.buckets, grads)):
            masked = [r for r in range(len(roles)) if b.masks is not None and b.flags[r]]
            plain = [r for r in range(len(roles)) if r not in masked and not (r == g_r and grad_checked)]
            if plain:
                bad.append(_nonfinite([gs[r] for r in plain], b.nonempty))
            if masked:
                g = grams[bi] = self._gram(b, gs, direct)
                diag = g[masked[0], masked[0]]
                for r in masked[1:]:
                    diag = diag + g[r, r]
                bad.append(_is_nonfinite(diag) & _nonfinite([gs[r] for r in masked], b.nonempty))
        if not bad:
            return scaler_inf
        bad = [t if t.device == dev else t.to(dev) for t in bad]
        any_bad = bad[0] if len(bad) == 1 else torch.stack(bad).any()
        if not grad_checked:
            return any_bad.to(torch.float32)
        return scaler_inf.reshape(()) + any_bad  # fp32: nonzero skips the step

    def _combine_bucket(
        self,
        b: Bucket,
        grads: list[list[Tensor]],
        coeffs: dict[str, float | Tensor],
        clipping: tuple[Tensor | None, float | Tensor] | None,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        restore: dict | None,
        work: ContiguousWork,
        dtensor: bool,
        direct: bool,
    ) -> None:
        """One fused ``combine_step_`` over the bucket (its backend's implementation when ``direct``);
        ``clipping``: (the global gram, or None for the call's own; the bound): the step forms the
        clip factor; None: no clip."""
        group = b.group
        params = b.params
        dev = params[0].device
        real = _complex.real_list if b.complex else list
        kparams = b.kparams if not (b.noncontig or dtensor) else real(distributed.local_list(work(params)))
        lr = group["lr"]
        cs = [c.to(dev).reshape(()) if isinstance(c, Tensor) and c.device.type != "cpu" else c for c in coeffs.values()]
        values = {
            "rule": self._rule, "lr": lr.reshape(()) if isinstance(lr, Tensor) else lr, "coeffs": cs,
            "scale": 1.0, "mask": b.masks, "masked": b.flags,
            "mask_mode": b.mode, "penalty": group["penalty"] if b.has_pen else 0.0,
            "importance": b.pen.get("importance"), "anchor": b.pen.get("anchor"),
            "grad_scale": None if grad_scale is None else grad_scale.to(dev),
            "found_inf": None if found_inf is None else found_inf.to(dev),
            "restore_from": None if restore is None else real(distributed.local_list(work([restore[p] for p in params]))),
            **self._rule_kwargs(group),
        }  # fmt: skip
        if clipping is not None:
            clip_gram, clip = clipping
            if clip_gram is None:
                values["clip_own"] = True
            else:
                values["clip_gram"] = clip_gram if clip_gram.device == dev else clip_gram.to(dev)
            values["clip"] = (
                clip.to(dev).reshape(()) if isinstance(clip, Tensor) and clip.device.type != "cpu" else clip
            )
        if "init_momentum" in RULES[self._rule].hparams:
            values["init_momentum"] = b.init
        if not direct:
            ops.combine_step_(kparams, grads, b.states, backend=self.backend, **values)
            return
        fn = b.combine
        if b.backend != "reference" and _any_fp64(values):
            fn = implementation("combine_step_", "reference")  # an fp64 scalar: the reference's fp64 math
        if isinstance(values["penalty"], Tensor):
            values["penalty"] = values["penalty"].reshape(())
        if kparams is not b.kparams:  # working copies (non-contiguous or sharded): fresh addresses
            fn(kparams, grads, b.states, **values)
            return
        with stable_operands(b.tables):
            fn(kparams, grads, b.states, **values)

    def _clip_gram(
        self, layout: Layout, grads: list[list[list[Tensor]]], grams: dict[int, Tensor], direct: bool
    ) -> Tensor:
        """The fp32 ``[R, R]`` gram over every bucket (and rank) that the fused step's clip reads.

        One gram pass per bucket (shared with the AMP check); one bucket's gram is used as it
        is, several are summed in fp64 (as are ranks' shards) and rounded to fp32 once. The
        clip factor itself, ``min(1, clip / (norm + 1e-6))`` with ``norm^2 = c^T G c``, is formed
        inside ``combine_step_`` (``clip_gram=``): no host sync, no extra op per step.
        """
        total: Tensor | None = None
        for bi, (b, gs) in enumerate(zip(layout.buckets, grads)):
            g = grams.get(bi)
            if g is None:
                g = self._gram(b, gs, direct)
            total = g if total is None else total.double() + g.to(total.device, torch.float64)
        assert total is not None
        if layout.dtensor:
            total = distributed.reduce_gram_(total.double(), [p for b in layout.buckets for p in b.params])
        return total if total.dtype == torch.float32 else total.float()


_EMPTY: dict = {}
_PLAIN = (float, int, str, bool, type(None), tuple)


def _group_signature(group: dict[str, Any]) -> list:
    """The group's values: numbers, strings and tuples by value, anything else (tensors, lists) by identity."""
    return [(k, v if isinstance(v, _PLAIN) else id(v)) for k, v in group.items()]


def _nonzero(x: object) -> bool:
    """``x != 0`` without reading a tensor (a tensor counts as nonzero: it is read by the kernels)."""
    return isinstance(x, Tensor) or x != 0


def _any_fp64(values: dict[str, Any]) -> bool:
    xs = [values["lr"], values.get("clip"), values["penalty"], *values["coeffs"]]
    return any(isinstance(x, Tensor) and x.dtype == torch.float64 for x in xs)


def _dense(g: Tensor) -> Tensor:
    if g.is_sparse or g.layout != torch.strided:
        raise SparseGradientError("fastclu optimizers do not support sparse gradients")
    return g.contiguous()


def _is_nonfinite(x: Tensor) -> Tensor:
    """``~isfinite(x)`` in two ATen ops (isfinite + not are six on some devices): ``x - x`` is
    exactly 0 for a finite float and NaN for inf or NaN."""
    return (x - x) != 0


def _nonfinite(lists: list[list[Tensor]], nonempty: list[int] | None) -> Tensor:
    """0-d bool: any non-finite element in the tensors (one ``_foreach_norm(inf)``, read only;
    the largest of the norms is non-finite iff one is: ``max`` propagates NaN)."""
    ts = [t for gs in lists for t in (gs if nonempty is None else [gs[j] for j in nonempty])]
    if not ts:
        return torch.zeros((), dtype=torch.bool, device=lists[0][0].device if lists[0] else None)
    return _is_nonfinite(torch.stack(torch._foreach_norm(ts, math.inf)).max())


def _check_clip(clip: object) -> float | Tensor | None:
    if clip is None:
        return None
    clip = _as_scalar("clip", clip)
    if isinstance(clip, float) and not clip > 0.0:
        raise ValueError(f"clip must be > 0, got {clip}")
    return clip
