"""Weight perturbation (task vector, given direction, Philox row-scaled noise) and exact restore.

The noise is the counter-based Philox 4x32-10 stream of
:mod:`fastclu.ops.reference.philox`, written out here with 32-bit multiplies: counter
``(j & 0xffffffff, j >> 32, tensor index, 0)`` and key ``(seed lo, seed hi)``, so element ``j``
of tensor ``i`` gets the same random bits whatever block or launch computes it, and the noise
can be regenerated instead of stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.tables import TABLES
from fastclu.ops.triton import _multitensor as mt
from fastclu.ops.triton._multitensor import (
    BLOCK,
    C_AUX,
    C_INDEX,
    C_START,
    TL_BITS,
    _row_len,
    block_info,
    find_row,
    groups,
    helper,
    launch,
    layout,
    load_scalar,
    on_device,
    operand_ptr,
    row_field,
    scalar_arg,
    table_args,
    tl_dtype,
)


@helper
def philox_words(j, tensor_index, seed_lo, seed_hi):
    """The four uint32 Philox 4x32-10 output words for 64-bit element indices ``j``."""
    c0 = (j & 0xFFFFFFFF).to(tl.uint32)
    c1 = (j >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + tl.cast(tensor_index, tl.uint32)
    c3 = tl.zeros_like(c0)
    # tl.cast, not .to: an int argument equal to 1 arrives as a constexpr on the GPU
    k0 = tl.cast(seed_lo, tl.uint32)
    k1 = tl.cast(seed_hi, tl.uint32)
    for _ in tl.static_range(10):
        a = tl.full([1], 0xD2511F53, tl.uint32)
        b = tl.full([1], 0xCD9E8D57, tl.uint32)
        hi_b = tl.umulhi(b, c2)
        lo_b = b * c2
        hi_a = tl.umulhi(a, c0)
        lo_a = a * c0
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@helper
def _uniform(w):
    x = w.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, -x - 1, x)
    return x.to(tl.float32) * 4.6566127342e-10


@helper
def philox_normal(j, tensor_index, seed_lo, seed_hi):
    """fp32 standard normals: Box-Muller's cosine branch on the first two words, as tl.randn."""
    w0, w1, _, _ = philox_words(j, tensor_index, seed_lo, seed_hi)
    u1 = tl.maximum(_uniform(w0), 1.0e-7)
    u2 = _uniform(w1)
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit
def _words_kernel(out, start, n, tensor_index, seed_lo, seed_hi, BLOCK: tl.constexpr):
    # int arguments are typed by value (i32, u32 past 2**31): `start + n` in that type wraps,
    # so the bound is taken on the 64-bit position within the stream instead
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = i < n
    j = tl.cast(start, tl.int64) + i
    w0, w1, w2, w3 = philox_words(j, tensor_index, seed_lo, seed_hi)
    i = i * 4
    tl.store(out + i, w0.to(tl.int64), mask=m)
    tl.store(out + i + 1, w1.to(tl.int64), mask=m)
    tl.store(out + i + 2, w2.to(tl.int64), mask=m)
    tl.store(out + i + 3, w3.to(tl.int64), mask=m)


def philox_stream(seed: int, tensor_index: int, start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """int64 ``[count, 4]``: the Philox words of elements ``start ..`` of tensor ``tensor_index``.

    Exposed so tests can check the kernel's random integers against the reference bit for bit.
    """
    out = torch.empty(count * 4, dtype=torch.int64, device=device)
    if count:
        _words_kernel[(triton.cdiv(count, BLOCK),)](
            out, start, count, tensor_index, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, BLOCK=BLOCK
        )
    return out.view(count, 4)


@triton.jit
def _normal_kernel(out, start, n, tensor_index, seed_lo, seed_hi, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    j = tl.cast(start, tl.int64) + i
    tl.store(out + i, philox_normal(j, tensor_index, seed_lo, seed_hi), mask=i < n)


def philox_normal_stream(
    seed: int, tensor_index: int, count: int, device: torch.device | str = "cpu", start: int = 0
) -> Tensor:
    """fp32 ``[count]`` normals of the kernel stream (for tests; see reference ``philox_normal``)."""
    out = torch.empty(count, dtype=torch.float32, device=device)
    if count:
        _normal_kernel[(triton.cdiv(count, BLOCK),)](
            out, start, count, tensor_index, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, BLOCK=BLOCK
        )
    return out


@triton.jit
def _row_norm_kernel(tab, dyn, n_rows, DP: tl.constexpr, BLOCK: tl.constexpr, LAYOUT: tl.constexpr):
    # One program per row, columns in a fixed-order loop: deterministic, no second stage.
    pid = tl.program_id(0)
    t = find_row(tab, n_rows, pid, LAYOUT)  # chunks are rows here (aux: the row length)
    r = pid - row_field(tab, t, C_START, LAYOUT)
    ln = row_field(tab, t, C_AUX, LAYOUT)
    start = r.to(tl.int64) * ln
    p = operand_ptr(tab, dyn, LAYOUT, 0, t, DP)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for c in range(0, ln, BLOCK):
        cols = c + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(p + start + cols, mask=cols < ln, other=0.0).to(tl.float64)
        acc += x * x
    out = operand_ptr(tab, dyn, LAYOUT, 1, t, tl.float32)
    # fp64 sum of squares rounded once, as the reference's fp64 norm
    tl.store(out + r, tl.sqrt(tl.sum(acc, axis=0)).to(tl.float32))


def clean_row_norms(params: list[Tensor]) -> list[Tensor]:
    """fp32 L2 norm of each row (dim 0; ndim <= 1 is one row) of each tensor: ``[rows]`` each."""
    if not params:
        return []
    # one allocation for every tensor's norms (views of it), not one per tensor
    units = [p.shape[0] if p.dim() >= 2 else 1 for p in params]
    outs = list(mt.alloc(sum(units), torch.float32, params[0].device).split(units))
    if 0 in map(Tensor.numel, params):
        for o, p in zip(outs, params):
            if p.numel() == 0:
                o.zero_()  # rows of length 0 (or a lone empty row) have norm 0
    gs, _ = groups([params, outs], rows=True, dynamic=TABLES["row_norms"].dynamic)
    for g in gs:
        if g.n_blocks == 0:
            continue
        _row_norm_kernel[(g.n_blocks,)](*table_args(g), DP=tl_dtype(g.dtypes[0]), BLOCK=BLOCK, LAYOUT=layout(g))
    return outs


@triton.jit
def _perturb_kernel(
    tab, dyn, n_rows, s_ptr, s_val, seed_lo, seed_hi,
    blk0, S_T: tl.constexpr, MODE: tl.constexpr, BACKUP: tl.constexpr, DP: tl.constexpr, DS: tl.constexpr,
    BLOCK: tl.constexpr, EVEN: tl.constexpr, ALIGN: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    # MODE 0: d = theta - anchor; 1: d = direction; 2: d = Philox normal * row norm / sqrt(n)
    t, offs, m = block_info(tab, n_rows, tl.program_id(0) + blk0, BLOCK, EVEN, LAYOUT)
    pp = operand_ptr(tab, dyn, LAYOUT, 0, t, DP, ALIGN)
    s = load_scalar(s_ptr, s_val, S_T)
    raw = tl.load(pp + offs, mask=m)
    if BACKUP:
        tl.store(operand_ptr(tab, dyn, LAYOUT, 1, t, DP, ALIGN) + offs, raw, mask=m)
    p = raw.to(tl.float32)
    if MODE == 0:
        d = p - tl.load(operand_ptr(tab, dyn, LAYOUT, 2, t, DS, ALIGN) + offs, mask=m).to(tl.float32)
    elif MODE == 1:
        d = tl.load(operand_ptr(tab, dyn, LAYOUT, 2, t, DS, ALIGN) + offs, mask=m).to(tl.float32)
    else:
        ln = row_field(tab, t, C_AUX, LAYOUT)
        norm = tl.load(operand_ptr(tab, dyn, LAYOUT, 2, t, tl.float32, ALIGN) + offs // ln, mask=m)
        z = philox_normal(offs, row_field(tab, t, C_INDEX, LAYOUT), seed_lo, seed_hi)
        d = z * (norm / tl.sqrt_rn(ln.to(tl.float32)))
    tl.store(pp + offs, (p + s * d).to(DP), mask=m)


@register("perturb_", "triton")
@on_device
def perturb_(
    params: list[Tensor],
    scale: float | Tensor,
    *,
    backup: list[Tensor] | None,
    anchor: list[Tensor] | None,
    direction: list[Tensor] | None,
    seed: int | None,
    row_norms: list[Tensor] | None,
) -> list[Tensor] | None:
    """``backup = theta; theta += scale * d``; see :func:`fastclu.ops.perturb_`."""
    norms = None
    if seed is not None:
        if row_norms is None:
            norms = clean_row_norms(params)
        else:
            norms = [
                r.to(device=p.device, dtype=torch.float32).reshape(-1).contiguous() for r, p in zip(row_norms, params)
            ]
        src, mode = norms, 2
    elif anchor is not None:
        src, mode = anchor, 0
    else:
        src, mode = direction, 1
    if not params:
        return norms
    seed_v = 0 if seed is None else seed
    gs, _ = groups(
        [params, backup, src],
        dynamic=TABLES["perturb"].dynamic,
        aux=[_row_len(p) for p in params] if mode == 2 else None,
    )
    for g in gs:
        if g.n_blocks == 0:
            continue
        sp, sv, st = scalar_arg(scale, params[0].device, g.tab)
        launch(_perturb_kernel, g, 
            *table_args(g), sp, sv,
            seed_v & 0xFFFFFFFF, (seed_v >> 32) & 0xFFFFFFFF,
            S_T=st, MODE=mode, BACKUP=backup is not None, DP=tl_dtype(g.dtypes[0]), DS=tl_dtype(g.dtypes[2]),
            BLOCK=BLOCK,
        )  # fmt: skip
    return norms


@triton.jit
def _copy_kernel(
    tab, dyn, n_rows, blk0,
    DB: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr, ALIGN: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    t, offs, m = block_info(tab, n_rows, tl.program_id(0) + blk0, BLOCK, EVEN, LAYOUT)
    x = tl.load(operand_ptr(tab, dyn, LAYOUT, 1, t, DB, ALIGN) + offs, mask=m)
    tl.store(operand_ptr(tab, dyn, LAYOUT, 0, t, DB, ALIGN) + offs, x, mask=m)


@register("restore_", "triton")
@on_device
def restore_(params: list[Tensor], backup: list[Tensor]) -> None:
    """Bit-exact ``params[i].copy_(backup[i])`` (moved as same-width integers)."""
    if not params:
        return
    gs, _ = groups([params, backup], dynamic=TABLES["restore"].dynamic)
    for g in gs:
        if g.n_blocks == 0:
            continue
        launch(_copy_kernel, g, 
            *table_args(g),
            DB=TL_BITS[params[g.members[0]].element_size()], BLOCK=BLOCK,
        )  # fmt: skip
