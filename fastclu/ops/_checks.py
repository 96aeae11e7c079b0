"""Input validation shared by every op: runs before any backend touches a tensor.

Every check raises before anything is modified, and names the argument at fault.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLOAT_SET = frozenset(FLOAT_DTYPES)
_STRIDED = frozenset([torch.strided])
_layout = operator.attrgetter("layout")
_dtype = operator.attrgetter("dtype")
_shape = operator.attrgetter("shape")
_device = operator.attrgetter("device")


_compiling = torch.compiler.is_compiling


def _valid_fast(xs: list, floating: bool) -> bool:
    """Every entry passes :func:`tensor_list`'s checks, decided in C-level passes (no Python
    per tensor); on False the per-entry loop finds the culprit and names it. Dynamo cannot
    trace ``attrgetter``: while compiling, the loop decides."""
    return not _compiling() and (
        all(map(isinstance, xs, itertools.repeat(Tensor)))
        and set(map(_layout, xs)) <= _STRIDED
        and (not floating or set(map(_dtype, xs)) <= _FLOAT_SET)
        and all(map(Tensor.is_contiguous, xs))
    )


def tensor_list(name: str, xs: object, *, floating: bool = True) -> list[Tensor]:
    """Check ``xs`` is a sequence of dense, contiguous tensors (floating point unless told)."""
    if isinstance(xs, Tensor) or not isinstance(xs, Sequence):
        raise TypeError(f"{name} must be a list of tensors, got {type(xs).__name__}")
    out = list(xs)
    if _valid_fast(out, floating):
        return out
    for i, x in enumerate(out):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(x).__name__}")
        if x.is_sparse or x.layout != torch.strided:
            raise TypeError(f"{name}[{i}] must be a dense (strided) tensor, got layout {x.layout}")
        if floating and x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name}[{i}] must be a floating-point tensor (float32/float16/bfloat16/float64), got {x.dtype}"
            )
        if not x.is_contiguous():
            raise ValueError(f"{name}[{i}] must be contiguous (call .contiguous() first)")
    return out


def same_layout(name: str, xs: Sequence[Tensor], ref_name: str, ref: Sequence[Tensor]) -> None:
    """``xs`` aligned with ``ref``: same length, same shapes, same device per entry."""
    if len(xs) != len(ref):
        raise ValueError(f"{name} has {len(xs)} tensors but {ref_name} has {len(ref)}")
    if (
        not _compiling()
        and list(map(_shape, xs)) == list(map(_shape, ref))
        and list(map(_device, xs)) == list(map(_device, ref))
    ):  # C-level passes; the loop names the culprit (and is what Dynamo traces)
        return
    for i, (x, r) in enumerate(zip(xs, ref)):
        if x.shape != r.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(x.shape)} but {ref_name}[{i}] has {tuple(r.shape)}")
        if x.device != r.device:
            raise ValueError(f"{name}[{i}] is on {x.device} but {ref_name}[{i}] is on {r.device}")


def aligned(name: str, xs: object, ref_name: str, ref: Sequence[Tensor], *, floating: bool = True) -> list[Tensor]:
    out = tensor_list(name, xs, floating=floating)
    same_layout(name, out, ref_name, ref)
    return out


def same_dtype(name: str, xs: Sequence[Tensor], ref_name: str, ref: Sequence[Tensor], why: str) -> None:
    """``xs[i].dtype == ref[i].dtype`` for every entry (operands copied bit for bit: no silent cast)."""
    for i, (x, r) in enumerate(zip(xs, ref)):
        if x.dtype != r.dtype:
            raise TypeError(f"{name}[{i}] must have dtype {r.dtype} like {ref_name}[{i}] ({why}), got {x.dtype}")


def one_device(name: str, xs: Sequence[Tensor]) -> None:
    if not xs:
        return
    if any(x.device != xs[0].device for x in xs) if _compiling() else len(set(map(_device, xs))) > 1:
        devs = sorted({str(x.device) for x in xs})
        raise ValueError(f"{name} must all be on one device, got {devs}")


def packed_masks(name: str, masks: object, ref_name: str, ref: Sequence[Tensor]) -> list[Tensor]:
    """Bit-packed masks: uint8, ``ceil(numel/8)`` bytes per tensor, same device."""
    out = tensor_list(name, masks, floating=False)
    if len(out) != len(ref):
        raise ValueError(f"{name} has {len(out)} masks but {ref_name} has {len(ref)} tensors")
    for i, (m, r) in enumerate(zip(out, ref)):
        if m.dtype != torch.uint8:
            raise TypeError(f"{name}[{i}] must be a bit-packed uint8 tensor, got {m.dtype}")
        want = (r.numel() + 7) // 8
        if m.numel() != want:
            raise ValueError(
                f"{name}[{i}] has {m.numel()} bytes but {ref_name}[{i}] ({r.numel()} elements) needs {want}"
            )
        if m.dim() != 1:
            # A packed mask is flat (logical element order): a 2-D one with the right byte count is
            # most likely a mask of another layout (a transposed weight's), whose bits would land
            # on the wrong elements.
            raise ValueError(
                f"{name}[{i}] must be a 1-D packed mask of {want} bytes, got shape {tuple(m.shape)} "
                "(pack masks with fastclu.ops.pack_bits)"
            )
        if m.device != r.device:
            raise ValueError(f"{name}[{i}] is on {m.device} but {ref_name}[{i}] is on {r.device}")
    return out


def scalar(name: str, x: object, device: torch.device | None = None) -> float | Tensor:
    """A Python number or a 0-d (or 1-element) floating tensor, on ``device`` or the CPU."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(x.shape)}")
        if device is not None and x.device != device and x.device.type != "cpu":
            raise ValueError(f"{name} is on {x.device} but the tensors are on {device}")
        return x.reshape(())
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(x).__name__}")
    return float(x)


def choice(name: str, x: object, options: Sequence[str]) -> str:
    if x not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {x!r}")
    return x  # type: ignore[return-value]
