"""Complex parameters as real views, the way ``torch.optim`` steps them.

A complex parameter ``z`` of shape ``S`` is stepped as ``torch.view_as_real(z)`` (shape
``S + (2,)``, the real and imaginary parts as two real numbers), together with its gradients,
its state and its anchor: SGD and AdamW then treat ``C`` as ``R^2`` element-wise, which is what
torch's single-tensor AdamW does (``view_as_real`` of param, grad and moments) and what its SGD
computes with complex arithmetic (real coefficients only). State tensors of a complex parameter
are complex (``complex64``; ``complex128`` for ``complex128`` parameters), as torch's, so a
state_dict has torch's layout and loads both ways.

Masks keep the complex parameter's shape: one bit per complex element, gating its real and
imaginary parts together (expanded to two bits per element when viewed as real; the packed mask
in the optimizer state stays the logical one). ``set_anchor`` takes complex importances and
anchors for complex parameters (the penalty acts on each part). ``complex32`` is not supported.

The ops (:mod:`fastclu.ops`) take real tensors only; the functions named like ops here are the
optimizers' entry points to them: identical to the op for real tensor lists (one dtype per list,
as the optimizers' buckets are), real views for complex ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from fastclu import ops

COMPLEX_DTYPES = (torch.complex64, torch.complex128)

__all__ = [
    "COMPLEX_DTYPES", "check_like", "combine_step_", "gram", "lerp_sync_", "real", "real_list", "real_masks", "refuse", "restore_",
    "state_dtype",
]  # fmt: skip


def state_dtype(p: Tensor) -> torch.dtype:
    """Dtype of a complex parameter's optimizer state: its own (real views of fp32 / fp64)."""
    return p.dtype


def check_like(name: str, v: object, p: Tensor) -> None:
    """``v`` (a state buffer, importance or anchor of ``p``) must be complex exactly when ``p`` is.

    A real tensor cast to complex would silently zero the imaginary part's state; a complex
    one cast to real would drop it.
    """
    if not isinstance(v, Tensor):
        kind = "complex" if p.is_complex() else "floating-point"
        raise TypeError(f"{name} must be a {kind} tensor, got {type(v).__name__}")
    if p.is_complex():
        if not v.is_complex():
            raise TypeError(f"{name} must be a complex tensor for a complex parameter ({p.dtype}), got {v.dtype}")
    elif not v.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")


def real(t: Tensor) -> Tensor:
    """``torch.view_as_real(t)`` for a complex tensor (a conjugate view resolved first), else ``t``."""
    if not t.is_complex():
        return t
    return torch.view_as_real(t.resolve_conj() if t.is_conj() else t)


def real_list(ts: Iterable[Tensor]) -> list[Tensor]:
    return [real(t) for t in ts]


def _real_mask(mask: Tensor, p: Tensor) -> Tensor:
    """A complex parameter's packed mask (one bit per complex element) -> two bits per element."""
    if not p.is_complex():
        return mask
    bits = ops.unpack_bits(mask, p.numel())
    return ops.pack_bits(bits.repeat_interleave(2))


def real_masks(mask: Sequence[Tensor] | None, params: Sequence[Tensor]) -> list[Tensor] | None:
    """Packed masks of (complex) ``params`` as masks of their real views (real params: unchanged)."""
    return None if mask is None else [_real_mask(m, p) for m, p in zip(mask, params)]


def _opt(ts: Sequence[Tensor] | None) -> list[Tensor] | None:
    return None if ts is None else real_list(ts)


def combine_step_(
    params: list[Tensor],
    grads: Sequence[list[Tensor]],
    state: dict[str, list[Tensor]],
    *,
    mask: list[Tensor] | None = None,
    importance: list[Tensor] | None = None,
    anchor: list[Tensor] | None = None,
    restore_from: list[Tensor] | None = None,
    **kwargs: Any,
) -> None:
    """:func:`fastclu.ops.combine_step_`; complex lists (``params[0]`` complex) as real views.

    ``mask`` holds the complex parameters' logical masks; ``state["step"]`` counters are real
    and passed as they are.
    """
    if not (params and params[0].is_complex()):
        ops.combine_step_(params, grads, state, mask=mask, importance=importance, anchor=anchor,
                          restore_from=restore_from, **kwargs)  # fmt: skip
        return
    ops.combine_step_(
        real_list(params), [real_list(g) for g in grads],
        {k: v if k == "step" else real_list(v) for k, v in state.items()},
        mask=real_masks(mask, params), importance=_opt(importance), anchor=_opt(anchor),
        restore_from=_opt(restore_from), **kwargs,
    )  # fmt: skip


def gram(grads: Sequence[list[Tensor]], *, mask: list[Tensor] | None = None, **kwargs: Any) -> Tensor:
    """:func:`fastclu.ops.gram`; complex role gradients as real views (``<a, b> = Re sum a conj(b)``)."""
    first = grads[0] if grads else []
    if not (first and first[0].is_complex()):
        return ops.gram(grads, mask=mask, **kwargs)
    return ops.gram([real_list(g) for g in grads], mask=real_masks(mask, first), **kwargs)


def restore_(params: list[Tensor], backup: list[Tensor], **kwargs: Any) -> None:
    """:func:`fastclu.ops.restore_`; complex tensors as real views (bit-exact either way)."""
    ops.restore_(real_list(params), real_list(backup), **kwargs)


def lerp_sync_(slow: list[Tensor], fast: list[Tensor], beta: float | Tensor, **kwargs: Any) -> None:
    """:func:`fastclu.ops.lerp_sync_`; complex slow / fast weights as real views."""
    ops.lerp_sync_(real_list(slow), real_list(fast), beta, **kwargs)


def refuse(params: Iterable[Tensor], who: str, why: str) -> None:
    """Raise a TypeError naming ``who`` when any of ``params`` is complex (before anything moves)."""
    for i, p in enumerate(params):
        if isinstance(p, Tensor) and p.is_complex():
            raise TypeError(f"{who} does not support complex parameters (parameter {i} is {p.dtype}): {why}")
