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

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from fastclu._registry import choose, current_backend, device_type, implementation, use_backend
from fastclu.ops import _checks as C
from fastclu.ops._spec import Arg, OpSpec, _hparam_value
from fastclu.ops.bits import count_bits, pack_bits, packed_numel, unpack_bits
from fastclu.ops.rules import HPARAMS, RULES, StepConfig

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
    "soup_coef_grads",
    "soup_combine_",
    "topk_mask",
    "unpack_bits",
    "use_backend",
]


def _route(spec: OpSpec, backend: str | None, values: dict) -> str:
    """The backend that runs this call: the registry's choice, except fp64 (decided here only).

    The kernels compute in fp32: a call with any fp64 operand gets the reference's fp64 math,
    not a silent downgrade (the reference runs on any device, CUDA included); the kernel
    backends never see an fp64 tensor.
    """
    main = values[spec.main]
    name = choose(spec.name, backend, device_type(main[0] if spec.args[0].kind == "roles" else main))
    if name != "reference" and _has_fp64(values):
        name = "reference"
    return name


_dtype_attr = operator.attrgetter("dtype")


def _has_fp64(x: object) -> bool:
    """True if any tensor in ``x`` (nested lists, tuples and dict values) is fp64."""
    if isinstance(x, Tensor):
        return x.dtype == torch.float64
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)) and torch.compiler.is_compiling():  # Dynamo cannot trace attrgetter
        return any(_has_fp64(y) for y in x)
    if isinstance(x, (list, tuple)):
        try:  # a flat list of tensors: one C-level pass
            return torch.float64 in map(_dtype_attr, x)
        except (AttributeError, TypeError):  # nested lists, None, numbers: entry by entry
            return any(map(_has_fp64, x))
    return False


SPECS: dict[str, OpSpec] = {}


def _spec(spec: OpSpec) -> OpSpec:
    SPECS[spec.name] = spec
    return spec


def _call(op: str, backend: str | None, values: dict) -> object:
    """Validate (from the op's spec), choose the backend, run it.

    While ``torch.compile`` traces, a kernel backend is reached through the op's registered
    ``fastclu::`` custom op (:mod:`fastclu.ops.library`): Dynamo cannot trace a launch that
    reads ``data_ptr()``, but it keeps a custom op as one opaque node, so a compiled training
    step does not graph-break. The reference backend is plain PyTorch and is traced as such.
    """
    spec = SPECS[op]
    values = spec.validate(values)
    name = _route(spec, backend, values)
    if name != "reference" and torch.compiler.is_compiling() and not spec.has_host_only(values):
        from fastclu.ops import library

        return library.run(spec, name, values)
    return spec.call(implementation(op, name), values)


def _check_fisher(v: dict) -> None:
    if v["power"] not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {v['power']!r}")


_spec(OpSpec("fisher_accumulate_", (
    Arg("fisher", "tensors", one_device=True, mutable=True),
    Arg("grads", "tensors", like="fisher"),
    Arg("scale", "scalar", 1.0),
    Arg("power", "int", 2, keyword=True),
), check=_check_fisher))  # fmt: skip


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
    _call("fisher_accumulate_", backend, {"fisher": fisher, "grads": grads, "scale": scale, "power": power})


def _check_ratio(v: dict) -> None:
    v["eps"] = float(C.scalar("eps", v["eps"]))


_spec(OpSpec("ratio_mask", (
    Arg("f_forget", "tensors", one_device=True),
    Arg("f_remain", "tensors", like="f_forget"),
    Arg("gamma", "scalar", 1.0),
    Arg("eps", "float", 1e-12, keyword=True),
), out="masks", check=_check_ratio))  # fmt: skip


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
    return _call("ratio_mask", backend, {"f_forget": f_forget, "f_remain": f_remain, "gamma": gamma, "eps": eps})


def _check_topk(v: dict) -> None:
    k = v["k"]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    total = sum(s.numel() for s in v["scores"])
    if not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}] (the number of scores), got {k}")


_spec(OpSpec("topk_mask", (Arg("scores", "tensors", one_device=True), Arg("k", "int")), out="masks", check=_check_topk))


def topk_mask(scores: list[Tensor], k: int, *, backend: str | None = None) -> list[Tensor]:
    """Exact global top-``k`` over all elements of all tensors, bit-packed.

    Exactly ``k`` bits are set (``0 <= k <= total``). Order is by value (NaN not allowed;
    -0.0 counts as equal to +0.0); among equal values the earlier element in global flat
    order (tensor index, then flat element index) wins. Implementations must not concatenate
    or sort the scores (histogram radix select over the ordered bit patterns).
    """
    return _call("topk_mask", backend, {"scores": scores, "k": k})


def _check_gram(v: dict) -> None:
    v["grads"], v["mask"], v["masked"] = _roles(v["grads"], v["mask"], v["masked"])


_spec(OpSpec("gram", (
    Arg("grads", "roles"),
    Arg("mask", "masks", None, optional=True, keyword=True),
    Arg("masked", "flags", None, keyword=True),
), out="gram", check=_check_gram))  # fmt: skip


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
    return _call("gram", backend, {"grads": grads, "mask": mask, "masked": masked})


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


def _check_combine(v: dict) -> None:
    params = v["params"]
    v["grads"], v["mask"], v["masked"] = _roles(v["grads"], v["mask"], v["masked"], ref=params, ref_name="params")
    n_roles = len(v["grads"])
    v["rule"] = C.choice("rule", v["rule"], tuple(RULES))
    v["mask_mode"] = C.choice("mask_mode", v["mask_mode"], ("grad", "update"))
    if v["mask_mode"] == "update" and v["mask"] is None:
        raise ValueError("mask_mode='update' needs a mask")
    coeffs = [1.0] * n_roles if v["coeffs"] is None else v["coeffs"]
    if len(coeffs) != n_roles:
        raise ValueError(f"coeffs has {len(coeffs)} entries but there are {n_roles} roles")
    dev = params[0].device if params else None
    v["coeffs"] = [C.scalar(f"coeffs[{r}]", c, dev) for r, c in enumerate(coeffs)]
    if (v["importance"] is None) != (v["anchor"] is None):
        raise ValueError("importance and anchor must be given together")
    for name in ("grad_scale", "found_inf"):
        t = v[name]
        if t is not None and (not isinstance(t, Tensor) or t.numel() != 1):
            raise TypeError(f"{name} must be a 1-element tensor or None")
    if v["restore_from"] is not None:
        C.same_dtype("restore_from", v["restore_from"], "params", params, "a bit-exact restore")
    _check_clip(v, n_roles, dev)
    _check_combine_state(v)


def _check_clip(v: dict, n_roles: int, dev: torch.device | None) -> None:
    gram, clip = v["clip_gram"], v["clip"]
    if gram is not None and v["clip_own"]:
        raise ValueError("clip_gram and clip_own=True are two ways to give the clip's gram: pass one")
    if isinstance(clip, float) and (gram is not None or v["clip_own"]) and not (math.isfinite(clip) and clip > 0.0):
        raise ValueError(f"clip must be a finite number > 0, got {clip}")
    if gram is None:
        return
    if not isinstance(gram, Tensor) or gram.shape != (n_roles, n_roles):
        got = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
        raise ValueError(f"clip_gram must be a [{n_roles}, {n_roles}] tensor (one row per role), got {got}")
    if gram.dtype != torch.float32:  # what gram() returns; an fp64 one would route the step to the reference
        raise TypeError(f"clip_gram must be float32 (as gram() returns it), got {gram.dtype}")
    if dev is not None and gram.device != dev:
        raise ValueError(f"clip_gram is on {gram.device} but the params are on {dev}")


def _check_hparams(v: dict) -> dict:
    """The rule's hyperparameters, typed and with defaults; another rule's set to a non-default
    value is an error (it would be ignored silently)."""
    rule = RULES[v["rule"]]
    given = dict(v["hparams"])
    unknown = [k for k in given if k not in HPARAMS]
    if unknown:
        raise TypeError(f"combine_step_() got an unexpected keyword argument {unknown[0]!r}")
    out = {}
    for name, default in HPARAMS.items():
        x = given.get(name, default)
        try:
            x = _hparam_value(x, default)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a {type(default).__name__}, got {x!r}") from e
        if isinstance(default, tuple) and len(x) != len(default):
            raise ValueError(f"{name} must have {len(default)} entries, got {len(x)}")
        if name in rule.hparams:
            out[name] = x
        elif x != default:
            raise ValueError(f"{name} is not a hyperparameter of rule={rule.name!r} (it takes {list(rule.hparams)})")
    return out


def _check_combine_state(v: dict) -> None:
    params, state = v["params"], v["state"]
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of tensor lists, got {type(state).__name__}")
    v["hparams"] = _check_hparams(v)
    cfg = StepConfig(v["rule"], v["lr"], v["maximize"], **v["hparams"])
    for key in cfg.state_keys:
        if key not in state:
            raise ValueError(f"state is missing {key!r} (needed by rule={cfg.rule!r})")
        if key == "step":
            steps = C.tensor_list("state['step']", state[key])
            if len(steps) != len(params) or any(s.numel() != 1 for s in steps):
                raise ValueError("state['step'] must hold one 1-element tensor per param")
        else:
            C.aligned(f"state[{key!r}]", state[key], "params", params)
    cfg.validate()  # the one validation of the rule's hyperparameters


_spec(OpSpec("combine_step_", (
    Arg("params", "tensors", one_device=True, mutable=True),
    Arg("grads", "roles"),
    Arg("state", "state"),
    Arg("rule", "str", "sgd", keyword=True),
    Arg("lr", "scalar", keyword=True),
    Arg("coeffs", "scalars", None, keyword=True),
    Arg("scale", "scalar", 1.0, keyword=True),
    Arg("mask", "masks", None, optional=True, keyword=True),
    Arg("masked", "flags", None, keyword=True),
    Arg("mask_mode", "str", "grad", keyword=True),
    Arg("penalty", "scalar", 0.0, keyword=True),
    Arg("importance", "tensors", None, like="params", optional=True, keyword=True),
    Arg("anchor", "tensors", None, like="params", optional=True, keyword=True),
    Arg("grad_scale", "tensor", None, keyword=True),
    Arg("found_inf", "tensor", None, keyword=True),
    Arg("restore_from", "tensors", None, like="params", optional=True, keyword=True),
    Arg("maximize", "bool", False, keyword=True),
    Arg("clip_gram", "tensor", None, keyword=True),
    Arg("clip", "scalar", 1.0, keyword=True),
    Arg("clip_own", "bool", False, keyword=True),
    Arg("hparams", "hparams", HPARAMS, keyword=True),
), check=_check_combine, state_keys=tuple(dict.fromkeys(k for r in RULES.values() for k in r.state))))  # fmt: skip


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
    maximize: bool = False,
    clip_gram: Tensor | None = None,
    clip: Scalar = 1.0,
    clip_own: bool = False,
    backend: str | None = None,
    **hparams: float | bool | tuple[float, ...],
) -> None:
    """Fused saliency-masked gradient combination + an update rule (SGD, AdamW, CLASSP), in place.

    Per element, in fp32::

        scale = scale * clip_factor                         # if clip_gram is given (below)
        g = scale * sum_r coeffs[r] * (m if masked[r] else 1) * grads[r]   # mask_mode "grad"
        g = g / grad_scale                                  # if grad_scale (AMP) is given
        g = g + penalty * importance * (theta - anchor)     # if importance/anchor given
        g = -g if maximize
        then the rule's update: torch.optim.SGD's or AdamW's (same op order as torch's
        single-tensor path), or CLASSP's (:class:`fastclu.optim.CLASSP`)

    Args:
        params: parameters (fp32/fp16/bf16), updated in place.
        grads: R <= 4 role gradient lists aligned with params (any float dtype).
        state: fp32 state lists aligned with params. ``rule="sgd"``: ``"momentum_buffer"``
            (required when ``momentum != 0``). ``rule="adamw"``: ``"exp_avg"``, ``"exp_avg_sq"``,
            ``"step"`` (0-d fp32 tensors, incremented by the op), and ``"max_exp_avg_sq"``
            when ``amsgrad``. ``rule="classp"``: ``"acc"`` (accumulated ``|g|**power``) and
            ``"step"``.
        rule: a name of :data:`fastclu.ops.rules.RULES`.
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
        maximize: negate the combined gradient (ascend).
        clip_gram, clip: the global-norm clip, formed on the device inside the step (no host
            sync, no extra launch): ``clip_gram`` is the ``[R, R]`` gram of the masked role
            gradients over every parameter the clip spans (:func:`gram`, summed over calls or
            ranks; fp32, on the params' device), ``clip`` the bound (> 0, float or 0-d
            tensor). In fp64, with ``c`` the coefficients as fp32 values:
            ``norm = sqrt(max(sum_rs c_r c_s G[r, s], 0))``, divided by ``grad_scale`` if
            given, and ``clip_factor = min(1, clip / (norm + 1e-6))`` (NaN propagates), cast
            to fp32 -- ``torch.nn.utils.clip_grad_norm_``'s factor for the combination.
        clip_own: the same clip with this call's own gram (its roles over its tensors, the
            gating the step applies: ``masked`` roles in ``mask_mode="grad"``), formed by the op
            -- for a clip that spans exactly this call's parameters. The kernel backends run
            their ``gram`` first; the reference's foreach formulation takes the norm of the
            combined gradient it forms anyway (no separate gram pass). Not with ``clip_gram``.
        hparams: the rule's hyperparameters (:attr:`fastclu.ops.rules.Rule.hparams`; another
            rule's at a non-default value is an error). ``sgd``: ``weight_decay``, ``momentum``,
            ``dampening``, ``nesterov``, ``init_momentum`` (the first step:
            ``momentum_buffer = d_p``, torch's ``buf is None`` branch; in update mode masked-out
            entries keep their value). ``adamw``: ``weight_decay``, ``betas``, ``eps``,
            ``amsgrad``. ``classp``: ``threshold`` (a weight moves only where
            ``g**2 > threshold``), ``power`` (``acc += |g|**power``), ``eps``,
            ``apply_scaling`` (divide by ``(acc + eps)**(1/power)``). Defaults:
            :data:`fastclu.ops.rules.HPARAMS`.
    """
    values = {
        "params": params, "grads": grads, "state": state, "rule": rule, "lr": lr, "coeffs": coeffs, "scale": scale,
        "mask": mask, "masked": masked, "mask_mode": mask_mode, "penalty": penalty, "importance": importance,
        "anchor": anchor, "grad_scale": grad_scale, "found_inf": found_inf, "restore_from": restore_from,
        "maximize": maximize, "clip_gram": clip_gram, "clip": clip, "clip_own": clip_own,
        "hparams": hparams,
    }  # fmt: skip
    _call("combine_step_", backend, values)


_spec(OpSpec("lerp_sync_", (
    Arg("slow", "tensors", one_device=True, mutable=True),
    Arg("fast", "tensors", like="slow", mutable=True),
    Arg("beta", "scalar"),
)))  # fmt: skip


def lerp_sync_(slow: list[Tensor], fast: list[Tensor], beta: Scalar, *, backend: str | None = None) -> None:
    """Fast-slow sync, in place: ``slow += beta * (fast - slow)``; then ``fast = slow``.

    slow may be fp32 (master copy) while fast is fp16/bf16; math in fp32.
    """
    _call("lerp_sync_", backend, {"slow": slow, "fast": fast, "beta": beta})


def _check_perturb(v: dict) -> None:
    params, backup = v["params"], v["backup"]
    if sum(v[k] is not None for k in ("anchor", "direction", "seed")) != 1:
        raise ValueError("perturb_ needs exactly one of anchor=, direction= or seed=")
    if backup is not None:
        for i, (b, p) in enumerate(zip(backup, params)):
            if b.dtype != p.dtype:
                raise TypeError(f"backup[{i}] must have dtype {p.dtype} (bit-exact restore), got {b.dtype}")
    seed, row_norms = v["seed"], v["row_norms"]
    if seed is None:
        if row_norms is not None:
            raise ValueError("row_norms is only used with seed=")
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if row_norms is not None:
        row_norms = v["row_norms"] = C.tensor_list("row_norms", row_norms)
        if len(row_norms) != len(params):
            raise ValueError(f"row_norms has {len(row_norms)} tensors but params has {len(params)}")
        for i, (r, p) in enumerate(zip(row_norms, params)):
            rows = p.shape[0] if p.dim() >= 2 else 1
            if r.numel() != rows:
                raise ValueError(f"row_norms[{i}] must have {rows} elements, got {r.numel()}")
            if r.device != p.device:
                raise ValueError(f"row_norms[{i}] is on {r.device} but params[{i}] is on {p.device}")


_spec(OpSpec("perturb_", (
    Arg("params", "tensors", one_device=True, mutable=True),
    Arg("scale", "scalar"),
    Arg("backup", "tensors", None, like="params", optional=True, mutable=True, keyword=True),
    Arg("anchor", "tensors", None, like="params", optional=True, keyword=True),
    Arg("direction", "tensors", None, like="params", optional=True, keyword=True),
    Arg("seed", "host", None, keyword=True),  # 64-bit: beyond the schema's int; seeded calls run directly
    Arg("row_norms", "host", None, keyword=True),
), check=_check_perturb))  # fmt: skip


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
    values = {"params": params, "scale": scale, "backup": backup, "anchor": anchor, "direction": direction,
              "seed": seed, "row_norms": row_norms}  # fmt: skip
    return _call("perturb_", backend, values)


def _check_restore(v: dict) -> None:
    for i, (b, p) in enumerate(zip(v["backup"], v["params"])):
        if b.dtype != p.dtype:
            raise TypeError(f"backup[{i}] must have dtype {p.dtype}, got {b.dtype}")


_spec(OpSpec("restore_", (
    Arg("params", "tensors", mutable=True),
    Arg("backup", "tensors", like="params"),
), check=_check_restore))  # fmt: skip


def restore_(params: list[Tensor], backup: list[Tensor], *, backend: str | None = None) -> None:
    """Bit-exact restore: ``params[i].copy_(backup[i])``."""
    _call("restore_", backend, {"params": params, "backup": backup})


def _check_hvp(v: dict) -> None:
    if isinstance(v["eps"], float) and v["eps"] == 0.0:
        raise ValueError("eps must be nonzero")


_spec(OpSpec("fd_hvp_", (
    Arg("out", "tensors", one_device=True, mutable=True),
    Arg("grads_plus", "tensors", like="out"),
    Arg("grads_minus", "tensors", like="out"),
    Arg("eps", "scalar"),
    Arg("accumulate", "bool", False, keyword=True),
), check=_check_hvp))  # fmt: skip


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
    values = {"out": out, "grads_plus": grads_plus, "grads_minus": grads_minus, "eps": eps, "accumulate": accumulate}
    _call("fd_hvp_", backend, values)


_spec(OpSpec("merge_stats", (
    Arg("params", "tensors", one_device=True),
    Arg("anchor", "tensors", like="params"),
    Arg("fisher_sum", "tensors", like="params"),
    Arg("fisher_theta_sum", "tensors", like="params"),
), out="pair"))  # fmt: skip


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
    values = {"params": params, "anchor": anchor, "fisher_sum": fisher_sum, "fisher_theta_sum": fisher_theta_sum}
    return _call("merge_stats", backend, values)


_spec(OpSpec("merge_", (
    Arg("params", "tensors", one_device=True, mutable=True),
    Arg("anchor", "tensors", like="params"),
    Arg("alpha", "scalar"),
)))  # fmt: skip


def merge_(params: list[Tensor], anchor: list[Tensor], alpha: Scalar, *, backend: str | None = None) -> None:
    """P&M merge, in place: ``theta = anchor + alpha * (theta - anchor)``."""
    _call("merge_", backend, {"params": params, "anchor": anchor, "alpha": alpha})


SOUP_MAX_INGREDIENTS = 12  # CUDA tables carry at most 15 operand lists (out, base and the differences)


def _soup_diffs(v: dict, ref_name: str) -> list[list[Tensor]]:
    diffs = v["diffs"]
    if not isinstance(diffs, (list, tuple)) or not all(isinstance(d, (list, tuple)) for d in diffs):
        raise TypeError("diffs must be a list of K tensor lists (one per ingredient)")
    if not 1 <= len(diffs) <= SOUP_MAX_INGREDIENTS:
        raise ValueError(f"diffs must hold 1..{SOUP_MAX_INGREDIENTS} ingredients, got {len(diffs)}")
    ref = v[ref_name]
    out = [C.aligned(f"diffs[{k}]", d, ref_name, ref) for k, d in enumerate(diffs)]
    for k, d in enumerate(out):
        for i, (t, r) in enumerate(zip(d, ref)):
            if t.device != r.device:
                raise ValueError(f"diffs[{k}][{i}] is on {t.device} but {ref_name}[{i}] is on {r.device}")
            if t.dtype != out[0][i].dtype:
                raise TypeError(f"diffs[{k}][{i}] has dtype {t.dtype} but diffs[0][{i}] has {out[0][i].dtype}")
    return out


def _check_soup_combine(v: dict) -> None:
    v["diffs"] = _soup_diffs(v, "out")
    out, base, coefs = v["out"], v["base"], v["coefs"]
    for i, (o, b) in enumerate(zip(out, base)):
        if b.device != o.device:
            raise ValueError(f"base[{i}] is on {b.device} but out[{i}] is on {o.device}")
    K, L = len(v["diffs"]), len(out)
    if not isinstance(coefs, Tensor) or not coefs.is_floating_point():
        raise TypeError(f"coefs must be a floating-point Tensor of shape [K, L] or [K, 1], got {type(coefs).__name__}")
    if coefs.dim() != 2 or coefs.shape[0] != K or coefs.shape[1] not in (1, L):
        raise ValueError(f"coefs must have shape [{K}, {L}] or [{K}, 1], got {list(coefs.shape)}")
    dev = out[0].device if out else coefs.device
    # fp32 coefficients keep a call on the kernels; fp64 only with fp64 tensors (the reference runs it)
    dt = torch.float64 if _has_fp64([out, base, v["diffs"]]) else torch.float32
    v["coefs"] = coefs.detach().to(device=dev, dtype=dt).contiguous()


_spec(OpSpec("soup_combine_", (
    Arg("out", "tensors", one_device=True, mutable=True),
    Arg("base", "tensors", like="out"),
    Arg("diffs", "roles"),
    Arg("coefs", "tensor"),
), check=_check_soup_combine))  # fmt: skip


def soup_combine_(
    out: list[Tensor],
    base: list[Tensor],
    diffs: Sequence[Sequence[Tensor]],
    coefs: Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Weighted combination of K ingredients, in place: ``out[i] = base[i] + sum_k c[k, l] * diffs[k][i]``.

    The MEHL-Soup point ``theta = c + sum_k x_k (theta_k - c)`` (``diffs[k] = theta_k - c``). Tensor
    ``i`` is layer ``l = i`` when ``coefs`` is ``[K, L]`` (``L = len(out)``: MEHL-Soup+), and every
    tensor uses column 0 when it is ``[K, 1]`` (one weight per ingredient).

    out: L tensors (any float dtype; fully overwritten, may be ``base`` itself). base: L tensors.
    diffs: K (1..12) lists aligned with ``out`` (ingredient ``k``'s tensors share one dtype per
    position). coefs: float ``[K, L]`` or ``[K, 1]`` (moved to ``out``'s device as fp32).
    Math in fp32 (fp64 when a tensor is fp64), summed over ``k`` in increasing order.
    """
    _call("soup_combine_", backend, {"out": out, "base": base, "diffs": diffs, "coefs": coefs})


def _check_soup_coef_grads(v: dict) -> None:
    v["diffs"] = _soup_diffs(v, "grads")


_spec(OpSpec("soup_coef_grads", (
    Arg("grads", "tensors", one_device=True),
    Arg("diffs", "roles"),
    Arg("layerwise", "bool", True, keyword=True),
), out="coefs", check=_check_soup_coef_grads))  # fmt: skip


def soup_coef_grads(
    grads: list[Tensor],
    diffs: Sequence[Sequence[Tensor]],
    *,
    layerwise: bool = True,
    backend: str | None = None,
) -> Tensor:
    """MEHL-Soup coefficient gradients in one pass: ``G[k, l] = <grads[l], diffs[k][l]>``.

    The chain rule of ``theta_l = c_l + sum_k x[k, l] diffs[k][l]``: ``dL/dx[k, l] = <dL/dtheta_l,
    diffs[k][l]>``. Returns ``[K, L]`` (``L = len(grads)``), or ``[K, 1]`` summed over the layers
    when ``layerwise=False``; fp32 (fp64 for fp64 inputs), on the grads' device. Products in fp32,
    accumulated in fp64 in a fixed order (per block, then the blocks of each tensor, then the
    layers): the same inputs give the same bits on every run.
    """
    return _call("soup_coef_grads", backend, {"grads": grads, "diffs": diffs, "layerwise": layerwise})
