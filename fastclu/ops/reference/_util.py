"""Helpers shared by the reference ops: the compute dtype and scalar handling."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from fastclu.ops.bits import unpack_bits_list

Scalar = float | Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any operand is fp64, else fp32: fp16/bf16 math is always done in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def as_compute(x: Scalar, dtype: torch.dtype) -> Scalar:
    """A scalar in the compute dtype; 0-d tensors stay tensors (no host sync) and keep their device.

    A 0-d CPU tensor combines with tensors on any device, so it is not moved.
    """
    if isinstance(x, Tensor):
        return x.to(dtype)
    return float(x)


def up(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in the compute dtype (no copy when it already is)."""
    return t.to(dtype)


def all_fp32(*lists: list[Tensor]) -> bool:
    """True when every tensor is fp32: then the ``torch._foreach_*`` path computes exactly what the
    per-tensor loop does (no casts in or out), with far fewer launches on a GPU."""
    return bool(lists[0]) and all(t.dtype == torch.float32 for xs in lists for t in xs)


# Unpacked masks of the last few mask lists seen, most recent last: (weakrefs, versions, bools).
# A training loop steps with the same packed masks for many steps (and gram + combine read the
# same list within one step), so the bits are unpacked once, not per tensor per call. An entry is
# valid only while every packed tensor is the same object at the same ``_version`` (an in-place
# write to a mask, or a new mask tensor, unpacks again). Bounded: each entry costs 1 byte per
# masked element.
_MASK_CACHE: list[tuple[list[weakref.ref], list[int], list[Tensor]]] = []
MASK_CACHE_SIZE = 4


def _versions(masks: list[Tensor]) -> list[int] | None:
    if torch.compiler.is_compiling() or any(m.is_inference() for m in masks):
        return None  # inference tensors have no version counter; under tracing, no Python-side cache
    return [m._version for m in masks]


def mask_bools(masks: list[Tensor], shapes: list[torch.Size]) -> list[Tensor]:
    """Bool masks shaped ``shapes`` from bit-packed ``masks`` (read-only views: do not write them)."""
    versions = _versions(masks)
    if versions is None:
        return unpack_bits_list(masks, shapes)
    for k, (refs, vers, bools) in enumerate(_MASK_CACHE):
        if (
            len(refs) == len(masks)
            and vers == versions
            and all(r() is m for r, m in zip(refs, masks))
            and all(b.shape == s for b, s in zip(bools, shapes))
        ):
            _MASK_CACHE.append(_MASK_CACHE.pop(k))
            return bools
    bools = unpack_bits_list(masks, shapes)
    _MASK_CACHE.append(([weakref.ref(m) for m in masks], versions, bools))
    del _MASK_CACHE[:-MASK_CACHE_SIZE]
    return bools


# False: the foreach formulations never read a tensor's value on the host, even a CPU one (tests
# set this to run the accelerator / meta formulas on CPU tensors).
HOST_READS = True


def host_readable(*xs: object) -> bool:
    """Whether every tensor among ``xs`` may be read on the host: CPU tensors outside tracing
    (reading one is no device sync). Meta and accelerator tensors never are."""
    return (
        HOST_READS
        and not torch.compiler.is_compiling()
        and all(not isinstance(x, Tensor) or x.device.type == "cpu" for x in xs)
    )
