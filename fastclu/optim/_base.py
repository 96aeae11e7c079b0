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

import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastclu import ops

STASH = "stash."
GRAD = "grad"
MAX_ROLES = 4


class SparseGradientError(TypeError, RuntimeError):
    """A sparse gradient reached a fastclu optimizer (dense tensors only)."""


def state_dtype(p: Tensor) -> torch.dtype:
    """Dtype of the optimizer state of ``p``: fp32, or fp64 for fp64 parameters."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _as_scalar(name: str, x: object) -> float | Tensor:
    if isinstance(x, Tensor):
        if x.numel() != 1 or not x.is_floating_point():
            raise ValueError(f"{name} must be a float or a 1-element floating tensor, got shape {tuple(x.shape)}")
        return x.reshape(())
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(x).__name__}")
    return float(x)


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
        super().__init__(params, {**defaults, **self._extra_group_keys})
        self.backend = backend

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in self._extra_group_keys.items():
                group.setdefault(k, v)
        self.__dict__.setdefault("backend", None)

    # ------------------------------------------------------------------ helpers
    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _check_group(self, group: dict[str, Any]) -> None:
        """Subclasses validate a param group's hyper-parameters (groups may be edited by users)."""

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
    ) -> None:
        """Install a saliency mask over all parameters (param-group order), or remove it (``mask=None``).

        Args:
            mask: a :class:`fastclu.saliency.SaliencyMask`, or a list (one entry per parameter)
                of bit-packed ``uint8[ceil(numel/8)]`` tensors (:mod:`fastclu.ops.bits` layout)
                or bool tensors shaped like the parameter.
            mode: ``"grad"``: the mask gates only the gradients of ``roles``; momentum and weight
                decay still move every weight. ``"update"``: where the mask is 0, neither the
                weight nor its optimizer state moves.
            roles: role names the mask gates in ``"grad"`` mode (``"grad"`` is the live
                ``.grad``); None gates every role.
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
        packed = getattr(mask, "packed", mask)
        if isinstance(packed, Tensor) or not isinstance(packed, Sequence):
            raise TypeError("mask must be a SaliencyMask or a list of tensors, one per parameter")
        if len(packed) != len(params):
            raise ValueError(f"mask has {len(packed)} entries but the optimizer has {len(params)} parameters")
        out = []
        for i, (m, p) in enumerate(zip(packed, params)):
            if not isinstance(m, Tensor):
                raise TypeError(f"mask[{i}] must be a tensor, got {type(m).__name__}")
            if m.dtype == torch.bool:
                if m.shape != p.shape:
                    raise ValueError(f"mask[{i}] has shape {tuple(m.shape)} but parameter {i} has {tuple(p.shape)}")
                m = ops.pack_bits(m)
            elif m.dtype != torch.uint8:
                raise TypeError(f"mask[{i}] must be bit-packed uint8 or bool, got {m.dtype}")
            elif m.numel() != ops.packed_numel(p.numel()):
                raise ValueError(
                    f"mask[{i}] has {m.numel()} bytes but parameter {i} ({p.numel()} elements) "
                    f"needs {ops.packed_numel(p.numel())}"
                )
            out.append(m.reshape(-1).to(p.device).contiguous())
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
            lam: penalty strength (>= 0).
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
        lam_f = _as_scalar("lam", lam)
        if isinstance(lam_f, Tensor):
            lam_f = float(lam_f)
        if not lam_f >= 0.0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        anchor = [p.detach() for p in params] if anchor is None else anchor
        for name, xs in (("importance", importance), ("anchor", anchor)):
            if isinstance(xs, Tensor) or not isinstance(xs, Sequence):
                raise TypeError(f"{name} must be a list of tensors, one per parameter")
            if len(xs) != len(params):
                raise ValueError(f"{name} has {len(xs)} tensors but the optimizer has {len(params)} parameters")
            for i, (x, p) in enumerate(zip(xs, params)):
                if not isinstance(x, Tensor) or not x.is_floating_point():
                    raise TypeError(f"{name}[{i}] must be a floating-point tensor")
                if x.shape != p.shape:
                    raise ValueError(f"{name}[{i}] has shape {tuple(x.shape)} but parameter {i} has {tuple(p.shape)}")
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
        """torch's ``load_state_dict``, but float state stays fp32 (torch would cast it to the param dtype)."""
        saved = state_dict.get("state", {}) if isinstance(state_dict, Mapping) else {}
        originals = {k: dict(v) for k, v in saved.items() if isinstance(v, Mapping)}
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]] if isinstance(
            state_dict, Mapping) and "param_groups" in state_dict else []  # fmt: skip
        super().load_state_dict(state_dict)
        for pid, p in zip(saved_ids, self._params()):
            if pid in originals:
                self.state[p] = {k: self._cast_state(p, k, v) for k, v in originals[pid].items()}

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
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._step(combine, clip, restore_from)
        return loss

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
            if not r.is_contiguous():
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
                if not p.is_contiguous():
                    raise ValueError("fastclu optimizers need contiguous parameters (channels_last is not supported)")
                plan.append((group, p, gs))
        if not plan:
            self.clear_stash()
            return

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
            self._combine_bucket(b, gating(b), coeffs, scale, grad_scale, found_inf, restore)
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
                ops.restore_(ps, [restore[p] for p in ps], backend=self.backend)
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
                b["grads"][r].append(g if g.is_contiguous() else g.contiguous())
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
        dev = params[0].device
        sc = scale.to(dev) if isinstance(scale, Tensor) else scale
        ops.combine_step_(
            params, b["grads"], self._state_lists(group, params), rule=self._rule, lr=group["lr"],
            coeffs=[c.to(dev) if isinstance(c, Tensor) and c.device.type != "cpu" else c for c in coeffs.values()],
            scale=sc, mask=mask, masked=flags if mask is not None else None, mask_mode=mode,
            grad_scale=None if grad_scale is None else grad_scale.to(dev),
            found_inf=None if found_inf is None else found_inf.to(dev),
            init_momentum=b["init"], backend=self.backend, **pen, **self._rule_kwargs(group),
            restore_from=None if restore is None else [restore[p] for p in params],
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
        total: Tensor | None = None
        for b in buckets:
            mask, flags = gating(b)
            g = ops.gram(b["grads"], mask=mask, masked=flags if mask is not None else None, backend=self.backend)
            total = g.double() if total is None else total + g.to(total.device, torch.float64)
        assert total is not None
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
