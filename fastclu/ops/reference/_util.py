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


# Unpacked masks of the last few mask lists seen, most recent last: (kind, weakrefs, versions,
# unpacked). A training loop steps with the same packed masks for many steps (and gram + combine
# read the same list within one step), so the bits are unpacked once, not per tensor per call. An
# entry is valid only while every packed tensor is the same object at the same ``_version`` (an
# in-place write to a mask, or a new mask tensor, unpacks again). Bounded: an entry costs 1 byte
# (bool) or 4 / 8 bytes (words) per masked element.
_MASK_CACHE: list[tuple[object, list[weakref.ref], list[int], list[Tensor]]] = []
MASK_CACHE_SIZE = 4


def _versions(masks: list[Tensor]) -> list[int] | None:
    if torch.compiler.is_compiling() or any(m.is_inference() for m in masks):
        return None  # inference tensors have no version counter; under tracing, no Python-side cache
    return [m._version for m in masks]


def _cached(kind: object, masks: list[Tensor], shapes: list[torch.Size], build) -> list[Tensor]:
    versions = _versions(masks)
    if versions is None:
        return build()
    for k, (knd, refs, vers, out) in enumerate(_MASK_CACHE):
        if (
            knd == kind
            and len(refs) == len(masks)
            and vers == versions
            and all(r() is m for r, m in zip(refs, masks))
            and all(o.shape == s for o, s in zip(out, shapes))
        ):
            _MASK_CACHE.append(_MASK_CACHE.pop(k))
            return out
    out = build()
    _MASK_CACHE.append((kind, [weakref.ref(m) for m in masks], versions, out))
    del _MASK_CACHE[:-MASK_CACHE_SIZE]
    return out


def mask_bools(masks: list[Tensor], shapes: list[torch.Size]) -> list[Tensor]:
    """Bool masks shaped ``shapes`` from bit-packed ``masks`` (read-only views: do not write them)."""
    return _cached("bool", masks, shapes, lambda: unpack_bits_list(masks, shapes))


WORD = {torch.float32: torch.int32, torch.float64: torch.int64}


def mask_words(masks: list[Tensor], shapes: list[torch.Size], dtype: torch.dtype) -> list[Tensor]:
    """Masks as integer words of ``dtype``'s width (``int32`` for fp32, ``int64`` for fp64): all
    bits set where the mask is 1, zero where it is 0 (read-only views: do not write them).

    ``x & w`` (on the bits of ``x``) is then exactly ``where(m, x, +0.0)``: a masked-out inf/NaN
    becomes +0.0, it does not leak. On the CPU ``torch.where`` is an unvectorised kernel, some
    30x slower than one bitwise AND.
    """
    word = WORD[dtype]
    return _cached(("words", word), masks, shapes, lambda: unpack_bits_list(masks, shapes, word))


def select(x: Tensor, w: Tensor) -> Tensor:
    """``where(m, x, +0.0)`` for ``w = mask_words(...)`` of ``x.dtype``: a new tensor."""
    return torch.bitwise_and(x.view(w.dtype), w).view(x.dtype)


def blend_(new: Tensor, old: Tensor, w: Tensor) -> None:
    """``new = where(m, new, old)`` in place, bit for bit (``w``: mask words, or a 0-d word)."""
    ni, oi = new.view(w.dtype), old.view(w.dtype)
    ni.bitwise_xor_(oi).bitwise_and_(w).bitwise_xor_(oi)


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
