"""Reference saliency masks: ``ratio_mask`` and the exact global ``topk_mask``.

``topk_mask`` is a histogram radix select: each score is mapped to an integer key whose signed
order is the float order, and the k-th largest key is found digit by digit (most significant
first) from per-tensor ``torch.bincount`` histograms. Nothing is concatenated or sorted; the
extra memory is one tensor's worth of temporaries plus a ``2**DIGIT_BITS`` histogram.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.bits import pack_bits
from fastclu.ops.reference._util import Scalar, as_compute, compute_dtype

DIGIT_BITS = 8
_RADIX = 1 << DIGIT_BITS


@register("ratio_mask", "reference")
def ratio_mask(f_forget: list[Tensor], f_remain: list[Tensor], gamma: Scalar, *, eps: float) -> list[Tensor]:
    """``pack((F_f + eps) >= gamma * (F_r + eps))`` per tensor, compared in fp32 (fp64 for fp64)."""
    out = []
    for ff, fr in zip(f_forget, f_remain):
        dt = compute_dtype(ff, fr)
        keep = (ff.to(dt) + eps) >= as_compute(gamma, dt) * (fr.to(dt) + eps)
        out.append(pack_bits(keep))
    return out


def _key_width(scores: list[Tensor]) -> int:
    # fp16/bf16 widen to fp32 exactly; fp64 keeps its own 64-bit order (narrowing would merge values).
    return 64 if any(s.dtype == torch.float64 for s in scores) else 32


def ordered_keys(s: Tensor, width: int) -> Tensor:
    """int64 keys, flat, whose signed order equals the float order of ``s`` (-0.0 == +0.0).

    For ``width == 32`` the keys are the fp32 bit patterns with the magnitude bits of negative
    numbers flipped (two's-complement order), sign-extended to int64; for ``width == 64`` the
    same on the fp64 patterns.
    """
    if width == 32:
        x = s.reshape(-1).to(torch.float32) + 0.0  # + 0.0 turns -0.0 into +0.0
        bits = x.view(torch.int32).to(torch.int64)
        return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    x = s.reshape(-1).to(torch.float64) + 0.0
    bits = x.view(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)


def _digit(keys: Tensor, shift: int, top: bool) -> Tensor:
    """The DIGIT_BITS-wide digit at ``shift``, as an unsigned bucket index in ``[0, _RADIX)``.

    The top digit carries the sign: an arithmetic shift gives ``[-R/2, R/2)``, offset to ``[0, R)``
    so that bucket order is key order.
    """
    if top:
        return (keys >> shift) + _RADIX // 2
    return (keys >> shift) & (_RADIX - 1)


@register("topk_mask", "reference")
def topk_mask(scores: list[Tensor], k: int) -> list[Tensor]:
    """Exactly ``k`` bits set: the k largest scores; ties go to the earlier global flat index."""
    if k == 0 or not scores:
        return [torch.zeros((s.numel() + 7) // 8, dtype=torch.uint8, device=s.device) for s in scores]
    for i, s in enumerate(scores):
        if s.numel() and bool(torch.isnan(s).any()):
            raise ValueError(f"scores[{i}] contains NaN (topk_mask needs totally ordered scores)")
    width = _key_width(scores)
    device = scores[0].device
    # The threshold key is found digit by digit: `prefix` holds its digits so far (the key bits
    # above `shift`), `need` how many of the top-k still lie among keys sharing that prefix.
    prefix = 0
    need = k
    for shift in range(width - DIGIT_BITS, -1, -DIGIT_BITS):
        top = shift == width - DIGIT_BITS
        hist = torch.zeros(_RADIX, dtype=torch.int64, device=device)
        for s in scores:
            if s.numel() == 0:
                continue
            keys = ordered_keys(s, width)
            if not top:
                keys = keys[(keys >> (shift + DIGIT_BITS)) == prefix]
            hist += torch.bincount(_digit(keys, shift, top), minlength=_RADIX)
        # Walk buckets from the largest digit down until `need` is covered.
        counts = hist.tolist()
        above = 0
        for b in range(_RADIX - 1, -1, -1):
            if above + counts[b] >= need:
                break
            above += counts[b]
        need -= above
        digit = b - _RADIX // 2 if top else b
        prefix = (prefix << DIGIT_BITS) | digit if not top else digit
    threshold = prefix  # the key of the k-th largest score; `need` of its copies are taken
    out = []
    for s in scores:
        keys = ordered_keys(s, width)
        keep = keys > threshold
        tie = keys == threshold
        if need > 0:
            # Earlier flat index wins: take the first `need` ties in order.
            taken = tie & (torch.cumsum(tie, dim=0) <= need)
            need -= int(tie.sum().clamp(max=need))
            keep |= taken
        out.append(pack_bits(keep))
    return out
