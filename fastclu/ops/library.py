"""The ops as ``torch.library`` custom ops, so a ``torch.compile``d step does not graph-break.

Each op is registered as ``fastclu::<name>`` with a fake (meta) implementation and runs
:mod:`fastclu.ops` (validation, then backend dispatch) when executed: Dynamo cannot trace a
kernel launch that reads ``data_ptr()``, but it keeps a custom op as one opaque graph node.

Custom-op schemas know no ``float | Tensor`` union, no optional or nested tensor lists and no
dicts, so the registered ops take flat arguments: every device-capable scalar as a float plus a
0-d tensor (an empty placeholder list entry means "use the float"), absent tensor lists as empty
lists, the role gradients as four lists, the state dict as one list per key. The functions of
this module keep the signatures of :mod:`fastclu.ops` and translate; call them (they are
traceable Python) or ``torch.ops.fastclu.<name>`` directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

import fastclu.ops as O
from fastclu._registry import choose, device_type, implementation

__all__ = [
    "combine_step_",
    "fd_hvp_",
    "fisher_accumulate_",
    "gram",
    "lerp_sync_",
    "merge_",
    "merge_stats",
    "perturb_",
    "ratio_mask",
    "restore_",
    "topk_mask",
]

Scalar = float | Tensor


def _split(x: Scalar) -> tuple[float, list[Tensor]]:
    """(float, [tensor] or []): the schema-friendly form of a float-or-0-d-tensor scalar."""
    return (0.0, [x]) if isinstance(x, Tensor) else (float(x), [])


def _join(v: float, t: list[Tensor]) -> Scalar:
    return t[0] if t else v


def _b(backend: str) -> str | None:
    """Schema strings cannot be None: "" means automatic choice."""
    return backend or None


def _opt(xs: list[Tensor]) -> list[Tensor] | None:
    return xs if xs else None


def _masks_like(xs: list[Tensor]) -> list[Tensor]:
    return [torch.empty((x.numel() + 7) // 8, dtype=torch.uint8, device=x.device) for x in xs]


# --------------------------------------------------------------------------------------------
# registered ops (flat schemas)


@torch.library.custom_op("fastclu::fisher_accumulate_", mutates_args=("fisher",))
def _fisher(
    fisher: list[Tensor], grads: list[Tensor], scale: float, scale_t: list[Tensor], power: int, backend: str
) -> None:
    O.fisher_accumulate_(fisher, grads, _join(scale, scale_t), power=power, backend=_b(backend))


@torch.library.custom_op("fastclu::ratio_mask", mutates_args=())
def _ratio(
    f_forget: list[Tensor], f_remain: list[Tensor], gamma: float, gamma_t: list[Tensor], eps: float, backend: str
) -> list[Tensor]:
    return O.ratio_mask(f_forget, f_remain, _join(gamma, gamma_t), eps=eps, backend=_b(backend))


@torch.library.custom_op("fastclu::topk_mask", mutates_args=())
def _topk(scores: list[Tensor], k: int, backend: str) -> list[Tensor]:
    return O.topk_mask(scores, k, backend=_b(backend))


@torch.library.custom_op("fastclu::gram", mutates_args=())
def _gram(
    g0: list[Tensor], g1: list[Tensor], g2: list[Tensor], g3: list[Tensor], n_roles: int, mask: list[Tensor],
    masked: list[bool], backend: str,
) -> Tensor:  # fmt: skip
    roles = [g0, g1, g2, g3][:n_roles]
    return O.gram(roles, mask=_opt(mask), masked=masked if masked else None, backend=_b(backend))


@torch.library.custom_op(
    "fastclu::combine_step_",
    mutates_args=("params", "momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"),
)
def _combine(
    params: list[Tensor], g0: list[Tensor], g1: list[Tensor], g2: list[Tensor], g3: list[Tensor], n_roles: int,
    momentum_buffer: list[Tensor], exp_avg: list[Tensor], exp_avg_sq: list[Tensor], max_exp_avg_sq: list[Tensor],
    step: list[Tensor], rule: str, lr: float, lr_t: list[Tensor], coeffs: list[float],
    coeffs_t: list[Tensor], scale: float, scale_t: list[Tensor], mask: list[Tensor], masked: list[bool],
    mask_mode: str, penalty: float, penalty_t: list[Tensor], importance: list[Tensor], anchor: list[Tensor],
    grad_scale: list[Tensor], found_inf: list[Tensor], restore_from: list[Tensor], weight_decay: float,
    maximize: bool, momentum: float, dampening: float, nesterov: bool, init_momentum: bool, beta1: float,
    beta2: float, eps: float, amsgrad: bool, backend: str,
) -> None:  # fmt: skip
    state = {
        k: v
        for k, v in (("momentum_buffer", momentum_buffer), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                     ("max_exp_avg_sq", max_exp_avg_sq), ("step", step))
        if v
    }  # fmt: skip
    # coeffs_t holds one entry per role where a coefficient is a tensor, in role order
    it = iter(coeffs_t)
    cs = [next(it) if math.isnan(c) else c for c in coeffs]  # NaN marks "this role's coefficient is a tensor"
    O.combine_step_(
        params, [g0, g1, g2, g3][:n_roles], state, rule=rule, lr=_join(lr, lr_t), coeffs=cs,
        scale=_join(scale, scale_t), mask=_opt(mask), masked=masked if masked else None, mask_mode=mask_mode,
        penalty=_join(penalty, penalty_t), importance=_opt(importance), anchor=_opt(anchor),
        grad_scale=grad_scale[0] if grad_scale else None, found_inf=found_inf[0] if found_inf else None,
        restore_from=_opt(restore_from), weight_decay=weight_decay, maximize=maximize, momentum=momentum,
        dampening=dampening, nesterov=nesterov, init_momentum=init_momentum, betas=(beta1, beta2), eps=eps,
        amsgrad=amsgrad, backend=_b(backend),
    )  # fmt: skip


@torch.library.custom_op("fastclu::lerp_sync_", mutates_args=("slow", "fast"))
def _lerp(slow: list[Tensor], fast: list[Tensor], beta: float, beta_t: list[Tensor], backend: str) -> None:
    O.lerp_sync_(slow, fast, _join(beta, beta_t), backend=_b(backend))


@torch.library.custom_op("fastclu::perturb_", mutates_args=("params", "backup"))
def _perturb(
    params: list[Tensor], scale: float, scale_t: list[Tensor], backup: list[Tensor], anchor: list[Tensor],
    direction: list[Tensor], backend: str,
) -> None:  # fmt: skip
    O.perturb_(params, _join(scale, scale_t), backup=_opt(backup), anchor=_opt(anchor), direction=_opt(direction),
               backend=_b(backend))  # fmt: skip


@torch.library.custom_op("fastclu::restore_", mutates_args=("params",))
def _restore(params: list[Tensor], backup: list[Tensor], backend: str) -> None:
    O.restore_(params, backup, backend=_b(backend))


@torch.library.custom_op("fastclu::fd_hvp_", mutates_args=("out",))
def _hvp(
    out: list[Tensor], grads_plus: list[Tensor], grads_minus: list[Tensor], eps: float, eps_t: list[Tensor],
    accumulate: bool, backend: str,
) -> None:  # fmt: skip
    O.fd_hvp_(out, grads_plus, grads_minus, _join(eps, eps_t), accumulate=accumulate, backend=_b(backend))


@torch.library.custom_op("fastclu::merge_stats", mutates_args=())
def _merge_stats(
    params: list[Tensor], anchor: list[Tensor], fisher_sum: list[Tensor], fisher_theta_sum: list[Tensor], backend: str
) -> tuple[Tensor, Tensor]:
    num, den = O.merge_stats(params, anchor, fisher_sum, fisher_theta_sum, backend=_b(backend))
    # outputs of a custom op may not alias each other (the kernels return views of one buffer)
    return num.clone(), den.clone()


@torch.library.custom_op("fastclu::merge_", mutates_args=("params",))
def _merge(params: list[Tensor], anchor: list[Tensor], alpha: float, alpha_t: list[Tensor], backend: str) -> None:
    O.merge_(params, anchor, _join(alpha, alpha_t), backend=_b(backend))


# fake implementations: shapes and dtypes only; in-place ops return nothing
for _op in (_fisher, _combine, _lerp, _perturb, _restore, _hvp, _merge):
    _op.register_fake(lambda *args, **kwargs: None)
_ratio.register_fake(lambda f_forget, *args, **kwargs: _masks_like(f_forget))
_topk.register_fake(lambda scores, k, backend: _masks_like(scores))
_gram.register_fake(lambda g0, g1, g2, g3, n, mask, masked, backend: g0[0].new_empty((n, n), dtype=torch.float32))
_merge_stats.register_fake(
    lambda params, *args: (params[0].new_empty((), dtype=torch.float32), params[0].new_empty((), dtype=torch.float32))
)


# --------------------------------------------------------------------------------------------
# the public signatures of fastclu.ops, routed through the registered ops


def _roles(grads: Sequence[list[Tensor]]) -> tuple[list[list[Tensor]], int]:
    roles = [list(g) for g in grads]
    if not 1 <= len(roles) <= 4:
        raise ValueError(f"grads must hold 1 to 4 role lists, got {len(roles)}")
    return roles + [[] for _ in range(4 - len(roles))], len(roles)


def fisher_accumulate_(
    fisher: list[Tensor], grads: list[Tensor], scale: Scalar = 1.0, *, power: int = 2, backend: str | None = None
) -> None:
    """:func:`fastclu.ops.fisher_accumulate_` as ``fastclu::fisher_accumulate_``."""
    torch.ops.fastclu.fisher_accumulate_(fisher, grads, *_split(scale), power, backend or "")


def ratio_mask(
    f_forget: list[Tensor], f_remain: list[Tensor], gamma: Scalar = 1.0, *, eps: float = 1e-12,
    backend: str | None = None,
) -> list[Tensor]:  # fmt: skip
    """:func:`fastclu.ops.ratio_mask` as ``fastclu::ratio_mask``."""
    return torch.ops.fastclu.ratio_mask(f_forget, f_remain, *_split(gamma), eps, backend or "")


def topk_mask(scores: list[Tensor], k: int, *, backend: str | None = None) -> list[Tensor]:
    """:func:`fastclu.ops.topk_mask` as ``fastclu::topk_mask``."""
    return torch.ops.fastclu.topk_mask(scores, k, backend or "")


def gram(
    grads: Sequence[list[Tensor]], *, mask: list[Tensor] | None = None, masked: Sequence[bool] | None = None,
    backend: str | None = None,
) -> Tensor:  # fmt: skip
    """:func:`fastclu.ops.gram` as ``fastclu::gram``."""
    roles, n = _roles(grads)
    return torch.ops.fastclu.gram(*roles, n, mask or [], list(masked) if masked is not None else [], backend or "")


def combine_step_(
    params: list[Tensor],
    grads: Sequence[list[Tensor]],
    state: dict[str, list[Tensor]],
    *,
    rule: str = "sgd",
    lr: Scalar,
    coeffs: Sequence[Scalar] | None = None,
    scale: Scalar = 1.0,
    mask: list[Tensor] | None = None,
    masked: Sequence[bool] | None = None,
    mask_mode: str = "grad",
    penalty: Scalar = 0.0,
    importance: list[Tensor] | None = None,
    anchor: list[Tensor] | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    restore_from: list[Tensor] | None = None,
    weight_decay: float = 0.0,
    maximize: bool = False,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    init_momentum: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    amsgrad: bool = False,
    backend: str | None = None,
) -> None:
    """:func:`fastclu.ops.combine_step_` as ``fastclu::combine_step_`` (same arguments)."""
    roles, n = _roles(grads)
    cs = [1.0] * n if coeffs is None else list(coeffs)
    c_vals = [float("nan") if isinstance(c, Tensor) else float(c) for c in cs]
    c_tens = [c for c in cs if isinstance(c, Tensor)]
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of tensor lists, got {type(state).__name__}")
    st = [list(state.get(k, [])) for k in ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")]
    torch.ops.fastclu.combine_step_(
        params, *roles, n, *st, rule, *_split(lr), c_vals, c_tens, *_split(scale), mask or [],
        list(masked) if masked is not None else [], mask_mode, *_split(penalty), importance or [], anchor or [],
        [grad_scale] if grad_scale is not None else [], [found_inf] if found_inf is not None else [],
        restore_from or [], float(weight_decay), bool(maximize), float(momentum), float(dampening), bool(nesterov),
        bool(init_momentum), float(betas[0]), float(betas[1]), float(eps), bool(amsgrad), backend or "",
    )  # fmt: skip


def lerp_sync_(slow: list[Tensor], fast: list[Tensor], beta: Scalar, *, backend: str | None = None) -> None:
    """:func:`fastclu.ops.lerp_sync_` as ``fastclu::lerp_sync_``."""
    torch.ops.fastclu.lerp_sync_(slow, fast, *_split(beta), backend or "")


def perturb_(
    params: list[Tensor],
    scale: Scalar,
    *,
    backup: list[Tensor] | None = None,
    anchor: list[Tensor] | None = None,
    direction: list[Tensor] | None = None,
    seed: int | None = None,
    row_norms: list[Tensor] | None = None,
    backend: str | None = None,
) -> list[Tensor] | None:
    """:func:`fastclu.ops.perturb_` as ``fastclu::perturb_`` for ``anchor=`` / ``direction=``.

    Seeded noise returns the row norms, which the flat schema does not carry: it runs the
    backend directly (a graph break under ``torch.compile``, one per noise step).
    """
    if seed is not None:
        name = choose("perturb_", backend, device_type(params))
        return implementation("perturb_", name)(
            params, scale, backup=backup, anchor=anchor, direction=direction, seed=seed, row_norms=row_norms
        )
    torch.ops.fastclu.perturb_(params, *_split(scale), backup or [], anchor or [], direction or [], backend or "")
    return None


def restore_(params: list[Tensor], backup: list[Tensor], *, backend: str | None = None) -> None:
    """:func:`fastclu.ops.restore_` as ``fastclu::restore_``."""
    torch.ops.fastclu.restore_(params, backup, backend or "")


def fd_hvp_(
    out: list[Tensor], grads_plus: list[Tensor], grads_minus: list[Tensor], eps: Scalar, *, accumulate: bool = False,
    backend: str | None = None,
) -> None:  # fmt: skip
    """:func:`fastclu.ops.fd_hvp_` as ``fastclu::fd_hvp_``."""
    torch.ops.fastclu.fd_hvp_(out, grads_plus, grads_minus, *_split(eps), bool(accumulate), backend or "")


def merge_stats(
    params: list[Tensor], anchor: list[Tensor], fisher_sum: list[Tensor], fisher_theta_sum: list[Tensor], *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """:func:`fastclu.ops.merge_stats` as ``fastclu::merge_stats``."""
    return torch.ops.fastclu.merge_stats(params, anchor, fisher_sum, fisher_theta_sum, backend or "")


def merge_(params: list[Tensor], anchor: list[Tensor], alpha: Scalar, *, backend: str | None = None) -> None:
    """:func:`fastclu.ops.merge_` as ``fastclu::merge_``."""
    torch.ops.fastclu.merge_(params, anchor, *_split(alpha), backend or "")
