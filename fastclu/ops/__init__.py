"""Multi-tensor functional ops: one signature, three backends (reference, triton, cuda).

Every list argument is aligned with the first tensor list of the op (usually ``params``).
Scalars may be Python numbers or 0-d tensors (device tensors never force a host sync in the
kernel backends). Each op validates its inputs here, before any backend touches a tensor,
so a bad call raises ``TypeError``/``ValueError`` naming the argument and modifies nothing.
The reference backend (pure PyTorch) defines the semantics; the others must match it.

Float math is done in fp32 for fp16/bf16 tensors. A call with any fp64 tensor operand runs on
the reference backend whatever backend was asked for (the kernels compute in fp32; the
reference keeps fp64 math); this is decided in one place, ``_run``. Optimizer state is expected in fp32. Masks are bit-packed (see :mod:`fastclu.ops.bits`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastclu._registry import choose, current_backend, device_type, implementation, use_backend
from fastclu.ops import _checks as C
from fastclu.ops.bits import count_bits, pack_bits, packed_numel, unpack_bits

Scalar = float | Tensor

__all__ = [
    "combine_step_",
    "count_bits",
    "current_backend",
    "fd_hvp_",
    "fisher_accumulate_",
    "gram",
    "lerp_sync_",
    "merge_",
    "merge_stats",
    "pack_bits",
    "packed_numel",
    "perturb_",
    "ratio_mask",
    "restore_",
    "topk_mask",
    "unpack_bits",
    "use_backend",
]


def _run(op: str, backend: str | None, tensors: Sequence[Tensor], *args: object, **kwargs: object) -> object:
    """Run ``op`` on the chosen backend.

    While ``torch.compile`` traces, a kernel backend is reached through the op's registered
    ``fastclu::`` custom op (:mod:`fastclu.ops.library`): Dynamo cannot trace a launch that
    reads ``data_ptr()``, but it keeps a custom op as one opaque node, so a compiled training
    step does not graph-break. The reference backend is plain PyTorch and is traced as such.
    """
    name = choose(op, backend, device_type(tensors))
    if name != "reference" and _has_fp64((args, kwargs)):
        # The one place fp64 is decided. The kernels compute in fp32: a call with any fp64
        # operand gets the reference's fp64 math, not a silent downgrade (the reference runs on
        # any device, CUDA included); the kernel backends never see an fp64 tensor.
        name = "reference"
    if name != "reference" and torch.compiler.is_compiling():
        from fastclu.ops import library

        return getattr(library, op)(*args, backend=name, **kwargs)
    return implementation(op, name)(*args, **kwargs)


def _has_fp64(x: object) -> bool:
    """True if any tensor in ``x`` (nested lists, tuples and dict values) is fp64."""
    if isinstance(x, Tensor):
        return x.dtype == torch.float64
    if isinstance(x, (list, tuple)):
        return any(_has_fp64(y) for y in x)
    if isinstance(x, dict):
        return any(_has_fp64(y) for y in x.values())
    return False


def _device(xs: Sequence[Tensor]) -> torch.device | None:
    return xs[0].device if xs else None


def fisher_accumulate_(
    fisher: list[Tensor],
    grads: list[Tensor],
    scale: Scalar = 1.0,
    *,
    power: int = 2,
    backend: str | None = None,
) -> None:
    """In place: ``fisher[i] += scale * grads[i]**2`` (``power=2``) or ``scale * |grads[i]|`` (``power=1``).

    fisher: fp32 tensors (the accumulators); grads: any float dtype, same shapes.
    """
    fisher = C.tensor_list("fisher", fisher)
    grads = C.aligned("grads", grads, "fisher", fisher)
    C.one_device("fisher", fisher)
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power!r}")
    scale = C.scalar("scale", scale, _device(fisher))
    _run("fisher_accumulate_", backend, fisher, fisher, grads, scale, power=power)


def ratio_mask(
    f_forget: list[Tensor],
    f_remain: list[Tensor],
    gamma: Scalar = 1.0,
    *,
    eps: float = 1e-12,
    backend: str | None = None,
) -> list[Tensor]:
    """SFR-on's balanced saliency mask ``m = (F_f + eps) >= gamma * (F_r + eps)``, bit-packed.

    Returns one ``uint8[ceil(numel/8)]`` tensor per input tensor (see :mod:`fastclu.ops.bits`).
    """
    f_forget = C.tensor_list("f_forget", f_forget)
    f_remain = C.aligned("f_remain", f_remain, "f_forget", f_forget)
    C.one_device("f_forget", f_forget)
    gamma = C.scalar("gamma", gamma, _device(f_forget))
    eps = float(C.scalar("eps", eps))
    return _run("ratio_mask", backend, f_forget, f_forget, f_remain, gamma, eps=eps)


def topk_mask(scores: list[Tensor], k: int, *, backend: str | None = None) -> list[Tensor]:
    """Exact global top-``k`` over all elements of all tensors, bit-packed.

    Exactly ``k`` bits are set (``0 <= k <= total``). Order is by value (NaN not allowed;
    -0.0 counts as equal to +0.0); among equal values the earlier element in global flat
    order (tensor index, then flat element index) wins. Implementations must not concatenate
    or sort the scores (histogram radix select over the ordered bit patterns).
    """
    scores = C.tensor_list("scores", scores)
    C.one_device("scores", scores)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    total = sum(s.numel() for s in scores)
    if not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}] (the number of scores), got {k}")
    return _run("topk_mask", backend, scores, scores, k)


def gram(
    grads: Sequence[list[Tensor]],
    *,
    mask: list[Tensor] | None = None,
    masked: Sequence[bool] | None = None,
    backend: str | None = None,
) -> Tensor:
    """Gram matrix of the (masked) role gradients: ``G[r, s] = sum_i <m_r g_r[i], m_s g_s[i]>``.

    grads: R <= 4 role lists, each aligned with the first. ``m_r`` is the mask where
    ``masked[r]`` (default: every role, when a mask is given), else 1. Returns a symmetric
    fp32 ``[R, R]`` tensor on the grads' device, accumulated deterministically (no host sync).
    """
    grads, mask, masked = _roles(grads, mask, masked)
    return _run("gram", backend, grads[0], grads, mask=mask, masked=masked)


def _roles(
    grads: object, mask: object, masked: object, ref: list[Tensor] | None = None, ref_name: str = "grads[0]"
) -> tuple[list[list[Tensor]], list[Tensor] | None, list[bool]]:
    if isinstance(grads, Tensor) or not isinstance(grads, Sequence) or len(grads) == 0:
        raise TypeError("grads must be a non-empty list of role gradient lists")
    if len(grads) > 4:
        raise ValueError(f"grads supports at most 4 roles, got {len(grads)}")
    if ref is None:
        ref = C.tensor_list("grads[0]", grads[0])
        C.one_device("grads[0]", ref)
    roles = [C.aligned(f"grads[{r}]", g, ref_name, ref) for r, g in enumerate(grads)]
    masks = None if mask is None else C.packed_masks("mask", mask, ref_name, ref)
    if masked is None:
        flags = [masks is not None] * len(roles)
    else:
        flags = [bool(f) for f in masked]
        if len(flags) != len(roles):
            raise ValueError(f"masked has {len(flags)} flags but there are {len(roles)} roles")
        if any(flags) and masks is None:
            raise ValueError("masked flags are set but no mask was given")
    return roles, masks, flags


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
    """Fused saliency-masked gradient combination + SGD / AdamW update, in place.

    Per element, in fp32::

        g = scale * sum_r coeffs[r] * (m if masked[r] else 1) * grads[r]   # mask_mode "grad"
        g = g / grad_scale                                  # if grad_scale (AMP) is given
        g = g + penalty * importance * (theta - anchor)     # if importance/anchor given
        g = -g if maximize
        then torch.optim.SGD's or AdamW's update (same op order as torch's single-tensor path)

    Args:
        params: parameters (fp32/fp16/bf16), updated in place.
        grads: R <= 4 role gradient lists aligned with params (any float dtype).
        state: fp32 state lists aligned with params. ``rule="sgd"``: ``"momentum_buffer"``
            (required when ``momentum != 0``). ``rule="adamw"``: ``"exp_avg"``, ``"exp_avg_sq"``,
            ``"step"`` (0-d fp32 tensors, incremented by the op), and ``"max_exp_avg_sq"``
            when ``amsgrad``.
        lr: learning rate (float or 0-d tensor).
        coeffs: per-role coefficients (default all 1.0).
        scale: multiplies the combined role gradient (e.g. a clip factor from :func:`gram`).
        mask: bit-packed saliency mask per param. ``mask_mode="grad"``: gates the roles with
            ``masked[r]`` (default all); momentum and weight decay still move every weight.
            ``mask_mode="update"``: where the mask is 0, neither the weight nor its state moves.
        penalty, importance, anchor: EWC-style preserve term, fused.
        grad_scale, found_inf: AMP; grads are unscaled by ``grad_scale``; when
            ``found_inf != 0`` nothing (weights, state, step counters) changes.
        restore_from: if given, the step reads theta from these tensors (the clean weights
            kept by :func:`perturb_`) and writes the result to params: a fused ``restore_``.
            The restore is not part of the step: when ``found_inf`` skips the update, params
            still receive the ``restore_from`` values.
        init_momentum: SGD's first step: ``momentum_buffer = d_p`` instead of the update
            (torch's ``buf is None`` branch). In update mode masked-out entries keep their value.
    """
    params = C.tensor_list("params", params)
    C.one_device("params", params)
    roles, masks, flags = _roles(grads, mask, masked, ref=params, ref_name="params")
    rule = C.choice("rule", rule, ("sgd", "adamw"))
    mask_mode = C.choice("mask_mode", mask_mode, ("grad", "update"))
    if mask_mode == "update" and masks is None:
        raise ValueError("mask_mode='update' needs a mask")
    dev = _device(params)
    lr = C.scalar("lr", lr, dev)
    if coeffs is None:
        coeffs = [1.0] * len(roles)
    if len(coeffs) != len(roles):
        raise ValueError(f"coeffs has {len(coeffs)} entries but there are {len(roles)} roles")
    coeffs = [C.scalar(f"coeffs[{r}]", c, dev) for r, c in enumerate(coeffs)]
    scale = C.scalar("scale", scale, dev)
    penalty = C.scalar("penalty", penalty, dev)
    if (importance is None) != (anchor is None):
        raise ValueError("importance and anchor must be given together")
    if importance is not None:
        importance = C.aligned("importance", importance, "params", params)
        anchor = C.aligned("anchor", anchor, "params", params)
    if restore_from is not None:
        restore_from = C.aligned("restore_from", restore_from, "params", params)
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (not isinstance(t, Tensor) or t.numel() != 1):
            raise TypeError(f"{name} must be a 1-element tensor or None")
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of tensor lists, got {type(state).__name__}")
    if rule == "sgd":
        need = ["momentum_buffer"] if momentum != 0 else []
    else:
        need = ["exp_avg", "exp_avg_sq", "step"] + (["max_exp_avg_sq"] if amsgrad else [])
    for key in need:
        if key not in state:
            raise ValueError(f"state is missing {key!r} (needed by rule={rule!r})")
        if key == "step":
            steps = C.tensor_list("state['step']", state[key])
            if len(steps) != len(params) or any(s.numel() != 1 for s in steps):
                raise ValueError("state['step'] must hold one 1-element tensor per param")
        else:
            C.aligned(f"state[{key!r}]", state[key], "params", params)
    for name, v in (("weight_decay", weight_decay), ("momentum", momentum), ("dampening", dampening), ("eps", eps)):
        if not float(v) >= 0.0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if rule == "sgd" and nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov needs momentum > 0 and dampening == 0")
    if rule == "adamw" and not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"betas must be in [0, 1), got {betas}")
    _run("combine_step_", backend, params,
        params, roles, state,
        rule=rule, lr=lr, coeffs=coeffs, scale=scale, mask=masks, masked=flags, mask_mode=mask_mode,
        penalty=penalty, importance=importance, anchor=anchor, grad_scale=grad_scale,
        found_inf=found_inf, restore_from=restore_from, weight_decay=float(weight_decay),
        maximize=bool(maximize), momentum=float(momentum), dampening=float(dampening),
        nesterov=bool(nesterov), init_momentum=bool(init_momentum),
        betas=(float(betas[0]), float(betas[1])), eps=float(eps), amsgrad=bool(amsgrad),
    )  # fmt: skip


def lerp_sync_(slow: list[Tensor], fast: list[Tensor], beta: Scalar, *, backend: str | None = None) -> None:
    """Fast-slow sync, in place: ``slow += beta * (fast - slow)``; then ``fast = slow``.

    slow may be fp32 (master copy) while fast is fp16/bf16; math in fp32.
    """
    slow = C.tensor_list("slow", slow)
    fast = C.aligned("fast", fast, "slow", slow)
    C.one_device("slow", slow)
    beta = C.scalar("beta", beta, _device(slow))
    _run("lerp_sync_", backend, slow, slow, fast, beta)


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
    """Move the weights along a direction, in place: ``backup = theta; theta += scale * d``.

    Exactly one source of ``d``:
      * ``anchor``: the task vector ``d = theta - anchor`` (P&M);
      * ``direction``: a given ``d``;
      * ``seed``: row-scaled Gaussian noise ``d[r, j] = z[r, j] * ||theta[r, :]|| / sqrt(n)``
        where row ``r`` is an index of dim 0 (a tensor of ndim <= 1 is one row) and ``n`` the
        row length; ``z`` is the counter-based Philox 4x32-10 normal keyed on
        ``(seed, tensor index in the list, flat element index)`` (see
        :func:`fastclu.ops.reference.philox.philox_normal`). The fp32 row norms are taken from
        ``theta`` before the move unless ``row_norms`` is given, and are returned so the same
        noise can be regenerated (``perturb_(params, -scale, seed=..., row_norms=...)``).

    backup: optional tensors (same dtype as params) receiving the clean weights, for a
    bit-exact :func:`restore_`. Returns the row norms in seed mode, else None.
    """
    params = C.tensor_list("params", params)
    C.one_device("params", params)
    scale = C.scalar("scale", scale, _device(params))
    sources = [x is not None for x in (anchor, direction, seed)]
    if sum(sources) != 1:
        raise ValueError("perturb_ needs exactly one of anchor=, direction= or seed=")
    if backup is not None:
        backup = C.aligned("backup", backup, "params", params)
        for i, (b, p) in enumerate(zip(backup, params)):
            if b.dtype != p.dtype:
                raise TypeError(f"backup[{i}] must have dtype {p.dtype} (bit-exact restore), got {b.dtype}")
    if anchor is not None:
        anchor = C.aligned("anchor", anchor, "params", params)
    if direction is not None:
        direction = C.aligned("direction", direction, "params", params)
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        if row_norms is not None:
            row_norms = C.tensor_list("row_norms", row_norms)
            if len(row_norms) != len(params):
                raise ValueError(f"row_norms has {len(row_norms)} tensors but params has {len(params)}")
            for i, (r, p) in enumerate(zip(row_norms, params)):
                rows = p.shape[0] if p.dim() >= 2 else 1
                if r.numel() != rows:
                    raise ValueError(f"row_norms[{i}] must have {rows} elements, got {r.numel()}")
                if r.device != p.device:
                    raise ValueError(f"row_norms[{i}] is on {r.device} but params[{i}] is on {p.device}")
    elif row_norms is not None:
        raise ValueError("row_norms is only used with seed=")
    return _run(
        "perturb_",
        backend,
        params,
        params,
        scale,
        backup=backup,
        anchor=anchor,
        direction=direction,
        seed=seed,
        row_norms=row_norms,
    )


def restore_(params: list[Tensor], backup: list[Tensor], *, backend: str | None = None) -> None:
    """Bit-exact restore: ``params[i].copy_(backup[i])``."""
    params = C.tensor_list("params", params)
    backup = C.aligned("backup", backup, "params", params)
    for i, (b, p) in enumerate(zip(backup, params)):
        if b.dtype != p.dtype:
            raise TypeError(f"backup[{i}] must have dtype {p.dtype}, got {b.dtype}")
    _run("restore_", backend, params, params, backup)


def fd_hvp_(
    out: list[Tensor],
    grads_plus: list[Tensor],
    grads_minus: list[Tensor],
    eps: Scalar,
    *,
    accumulate: bool = False,
    backend: str | None = None,
) -> None:
    """Central finite difference: ``out = (g_plus - g_minus) / (2 * eps)`` (``+=`` if accumulate)."""
    out = C.tensor_list("out", out)
    grads_plus = C.aligned("grads_plus", grads_plus, "out", out)
    grads_minus = C.aligned("grads_minus", grads_minus, "out", out)
    C.one_device("out", out)
    eps = C.scalar("eps", eps, _device(out))
    if isinstance(eps, float) and eps == 0.0:
        raise ValueError("eps must be nonzero")
    _run("fd_hvp_", backend, out, out, grads_plus, grads_minus, eps, accumulate=bool(accumulate))


def merge_stats(
    params: list[Tensor],
    anchor: list[Tensor],
    fisher_sum: list[Tensor],
    fisher_theta_sum: list[Tensor],
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The two P&M sums in one pass, with ``delta = theta - anchor``::

        num = sum delta * (fisher_theta_sum - anchor * fisher_sum)
        den = sum delta**2 * fisher_sum

    Returns two fp32 0-d tensors on the params' device (alpha = clamp(num / den, 0, 1)).
    """
    params = C.tensor_list("params", params)
    C.one_device("params", params)
    anchor = C.aligned("anchor", anchor, "params", params)
    fisher_sum = C.aligned("fisher_sum", fisher_sum, "params", params)
    fisher_theta_sum = C.aligned("fisher_theta_sum", fisher_theta_sum, "params", params)
    return _run("merge_stats", backend, params, params, anchor, fisher_sum, fisher_theta_sum)


def merge_(params: list[Tensor], anchor: list[Tensor], alpha: Scalar, *, backend: str | None = None) -> None:
    """P&M merge, in place: ``theta = anchor + alpha * (theta - anchor)``."""
    params = C.tensor_list("params", params)
    C.one_device("params", params)
    anchor = C.aligned("anchor", anchor, "params", params)
    alpha = C.scalar("alpha", alpha, _device(params))
    _run("merge_", backend, params, params, anchor, alpha)
