"""Triton side of the multi-tensor launches: the shared tables (:mod:`fastclu.ops._table`) as
Triton sees them, and the device helpers that walk them.

One launch covers every tensor of a dtype signature (Triton's dtypes are constexprs), split in
two: whole blocks (``EVEN``: no bounds mask, vectorisable), whose program finds its tensor by a
binary search over the rows' ``chunk_start`` (whole blocks only), then one tail program per
tensor whose size is not a multiple of ``BLOCK`` (row from the table's tail list). The table is
O(tensors); per-step operands (gradients, fresh outputs) are declared per op in ``dynamic`` and
read through the separate pointer array, so they never cause a rebuild.

Kernel-side API (every multi-tensor kernel takes ``tab, dyn, n_rows`` first and the constexprs
``EVEN``, ``ALIGN``, ``LAYOUT`` from :func:`launch`; ``LAYOUT`` packs the operand count and the
per-step operand mask, see :attr:`Group.layout`):

- ``t, offs, m = block_info(tab, n_rows, pid, BLOCK, EVEN, LAYOUT)``: row, 64-bit offsets, mask;
- ``operand_ptr(tab, dyn, LAYOUT, k, t, DT, ALIGN)``: typed address of operand ``k`` of row ``t``;
- ``row_field(tab, t, COL, LAYOUT)``: a header column (``COL_NUMEL``, ``COL_INDEX``, ``COL_AUX``);
- ``block_rank(tab, t, offs, BLOCK, LAYOUT)``: the block's global rank (list order over groups).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastclu.ops import _table
from fastclu.ops._table import COL_AUX, COL_INDEX, COL_NUMEL, COL_RANK, COL_START, HEADER, Part

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Under the interpreter every program costs a Python round trip, so fewer, larger blocks win;
# on a GPU 1024 lanes per program keeps enough programs in flight for any size of interest.
BLOCK = 4096 if INTERPRET else 1024


def helper(fn):
    """``triton.jit`` for device helpers; under the interpreter a plain function.

    The interpreter re-patches the language module on every call of a jitted function (a few
    ms each), which dominated the CPU test time; called from an interpreted kernel, a plain
    function sees the already patched module and computes the same thing.
    """
    return fn if INTERPRET else triton.jit(fn)


TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
    torch.uint8: tl.uint8,
    torch.int32: tl.int32,
    torch.int64: tl.int64,
}
# Same-width integer types: copying through them is bit-exact whatever the float payload.
TL_BITS = {1: tl.uint8, 2: tl.int16, 4: tl.int32, 8: tl.int64}

_HEADER = tl.constexpr(HEADER)
_COL_START = tl.constexpr(COL_START)
_COL_NUMEL = tl.constexpr(COL_NUMEL)
_COL_RANK = tl.constexpr(COL_RANK)
C_START = tl.constexpr(COL_START)
C_NUMEL = tl.constexpr(COL_NUMEL)
C_INDEX = tl.constexpr(COL_INDEX)
C_AUX = tl.constexpr(COL_AUX)

Group = Part  # one launch's table (fastclu.ops._table.Part), with the Triton views below


def launches(g: Group) -> list[tuple[int, int, bool]]:
    """``(first block, programs, EVEN)`` per launch: whole blocks unmasked, then the tails."""
    out = [(0, g.n_full, True), (0, g.n_tail, False)]
    return [x for x in out if x[1] > 0]


def layout(g: Group) -> int:
    """The ``LAYOUT`` constexpr: operand count in bits 0-7, per-step operand mask from bit 8."""
    return g.n_ops + 256 * g.dyn_mask


def block_map(g: Group, chunk: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Host expansion of the launches (tests only): per program in launch order its tensor
    position in the group, first element and global rank."""
    chunk = chunk or BLOCK
    rows = _table.host_rows(g)
    t, s, r = [], [], []
    for i, row in enumerate(rows):
        for b in range(int(row[COL_NUMEL]) // chunk):
            t.append(i)
            s.append(b * chunk)
            r.append(int(row[COL_RANK]) + b)
    for i in _table.host_tails(g).tolist():
        n = int(rows[i, COL_NUMEL])
        t.append(i)
        s.append(n // chunk * chunk)
        r.append(int(rows[i, COL_RANK]) + n // chunk)
    return t, s, r


def alloc(shape: tuple[int, ...] | int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialised output/scratch memory for the kernels (every element gets written).

    One indirection so tests can swap in a poisoning allocator and catch unwritten elements.
    """
    return torch.empty(shape, dtype=dtype, device=device)


def tl_dtype(dt: torch.dtype | None) -> tl.dtype:
    # An absent operand still needs some constexpr type; its pointer is never dereferenced.
    return tl.float32 if dt is None else TL_DTYPE[dt]


def groups(
    operands: Sequence[Sequence[Tensor] | None],
    chunk: int = BLOCK,
    *,
    rows: bool = False,
    dynamic: Sequence[int] = (),
    aux: Sequence[int] | None = None,
) -> tuple[list[Group], int]:
    """Group aligned operand lists by dtype signature and fetch (or build) their tables.

    operands: lists aligned with ``operands[0]`` (None for an absent operand), which gives the
    sizes. ``dynamic``: the operands whose addresses change per step (gradients, outputs
    allocated per call): not part of the cache key, passed through the pointer array. Every
    tensor gets a row (empty ones no block). With ``rows=True`` a block is one whole row (dim 0
    of ``operands[0][i]``; ndim <= 1 is one row) and ``aux`` is the row length. Returns the
    groups and the total number of blocks.
    """
    main = operands[0]
    dev = main[0].device if main else torch.device("cpu")
    if rows:
        units = [t.shape[0] if t.dim() >= 2 else 1 for t in main]
        aux = [_row_len(t) for t in main]
        entry = _table.get("triton", operands, dev, chunk=1, by_dtype=True, dynamic=dynamic, units=units, aux=aux,
                           keep_empty=True)  # fmt: skip
    else:
        entry = _table.get("triton", operands, dev, chunk=chunk, split_tails=True, by_dtype=True, dynamic=dynamic,
                           aux=aux, keep_empty=True)  # fmt: skip
    return entry.parts, entry.n_chunks


def on_device(fn: Callable) -> Callable:
    """Run an op with its tensors' CUDA device current.

    Triton launches on the *current* device and its current stream, not on the device of the
    pointers it is given: tensors on ``cuda:1`` while ``cuda:0`` is current would be read by a
    kernel on the wrong GPU. The first tensor found in the first argument decides.
    """

    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> object:
        x = args[0] if args else None
        while isinstance(x, (list, tuple)) and x:
            x = x[0]
        if isinstance(x, Tensor) and x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


def _row_len(t: Tensor) -> int:
    return t.numel() // t.shape[0] if t.dim() >= 2 and t.shape[0] > 0 else t.numel()


def scalar_arg(x: float | Tensor, device: torch.device, dummy: Tensor) -> tuple[Tensor, float, bool]:
    """(pointer, value, is_tensor) for a kernel scalar: device tensors stay on the device.

    A 0-d tensor already on the kernels' device is read in the kernel (no host sync, graph
    capturable); a CPU tensor is host memory anyway, so reading it costs no device sync.
    """
    if isinstance(x, Tensor):
        if x.device == device:
            return x, 0.0, True
        return dummy, float(x), False
    return dummy, float(x), False


@helper
def f64(hi, lo):
    """The fp64 value of a double passed as two fp32 kernel arguments (see ``combine._split``)."""
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


@helper
def load_scalar(ptr, val, IS_T: tl.constexpr):
    if IS_T:
        return tl.load(ptr).to(tl.float32)
    else:
        return tl.cast(val, tl.float32)


@helper
def row_field(tab, t, COL: tl.constexpr, LAYOUT: tl.constexpr):
    """Header column ``COL`` of row ``t`` (int64)."""
    return tl.load(tab + t * (_HEADER + (LAYOUT & 255)) + COL)


@helper
def find_row(tab, n_rows, c, LAYOUT: tl.constexpr):
    """The last row whose ``chunk_start <= c``: binary search, O(log tensors) loads."""
    lo = n_rows * 0
    hi = n_rows - 1
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        ok = tl.load(tab + mid * (_HEADER + (LAYOUT & 255)) + _COL_START) <= c
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@helper
def block_start(tab, n_rows, pid, BLOCK: tl.constexpr, EVEN: tl.constexpr, LAYOUT: tl.constexpr):
    """(row, first element) of program ``pid``: a whole block (``EVEN``) or a tensor's tail."""
    if EVEN:
        t = find_row(tab, n_rows, pid, LAYOUT)
        start = (pid - row_field(tab, t, _COL_START, LAYOUT)) * BLOCK
    else:
        t = tl.load(tab + n_rows * (_HEADER + (LAYOUT & 255)) + pid).to(tl.int32)
        start = row_field(tab, t, _COL_NUMEL, LAYOUT) // BLOCK * BLOCK
    return t, tl.multiple_of(start.to(tl.int64), BLOCK)


@helper
def block_info(tab, n_rows, pid, BLOCK: tl.constexpr, EVEN: tl.constexpr, LAYOUT: tl.constexpr):
    """(row, 64-bit element offsets, in-bounds mask) of program ``pid``.

    Blocks start at multiples of BLOCK; with ``EVEN`` the block is known to be whole and the
    mask is a constant (so loads and stores can be vectorised).
    """
    t, start = block_start(tab, n_rows, pid, BLOCK, EVEN, LAYOUT)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    m = tl.full([BLOCK], 1, tl.int1) if EVEN else offs < row_field(tab, t, _COL_NUMEL, LAYOUT)
    return t, offs, m


@helper
def block_info_ranked(tab, n_rows, pid, BLOCK: tl.constexpr, EVEN: tl.constexpr, LAYOUT: tl.constexpr):
    """:func:`block_info` and the block's global rank (list order over every group of the call)."""
    t, start = block_start(tab, n_rows, pid, BLOCK, EVEN, LAYOUT)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    m = tl.full([BLOCK], 1, tl.int1) if EVEN else offs < row_field(tab, t, _COL_NUMEL, LAYOUT)
    return t, offs, m, row_field(tab, t, _COL_RANK, LAYOUT) + start // BLOCK


@helper
def block_rank(tab, t, start, BLOCK: tl.constexpr, LAYOUT: tl.constexpr):
    """Global rank of the block starting at element ``start`` of row ``t`` (list order)."""
    return row_field(tab, t, _COL_RANK, LAYOUT) + start // BLOCK


@helper
def operand_ptr(tab, dyn, LAYOUT: tl.constexpr, row: tl.constexpr, t, DT: tl.constexpr, ALIGN: tl.constexpr = 1):
    """Address of operand ``row`` of row ``t`` as a typed pointer (``ALIGN``: known byte alignment)."""
    v = tl.load(tab + t * (_HEADER + (LAYOUT & 255)) + _HEADER + row)
    # bit 8 + row of LAYOUT, written with // and ** : the interpreter passes LAYOUT as an int and
    # module-level rows as constexprs, and constexpr has no reflected shift
    if (LAYOUT // 2 ** (8 + row)) % 2 == 1:
        v = tl.load(dyn + (-1 - v))  # a per-step operand: its slot holds -(1 + index into dyn)
    ptr = v.to(tl.pointer_type(DT))
    if ALIGN > 1:
        # on the pointer itself: the compiler's alignment analysis does not see through int_to_ptr
        ptr = tl.multiple_of(ptr, ALIGN)
    return ptr


@helper
def slot_ptr(tab, t, k: tl.constexpr, LAYOUT: tl.constexpr):
    """Address of operand ``k``'s slot in row(s) ``t`` (per-tensor work over many rows at once;
    only for stable operands, whose slot holds the address itself)."""
    return tab + t * (_HEADER + (LAYOUT & 255)) + _HEADER + k


def launch(kernel, g: Group, *args, **meta) -> None:
    """Run ``kernel`` over group ``g``: whole blocks (``EVEN=True``), then the tail blocks.

    The kernel takes ``blk0`` (0: kept for kernels that split a grid) after ``args`` and the
    constexprs ``EVEN``, ``ALIGN`` (the group's address alignment) and ``LAYOUT`` besides ``meta``.
    """
    lay = layout(g)
    for blk0, n, even in launches(g):
        kernel[(n,)](*args, blk0, EVEN=even, ALIGN=g.align, LAYOUT=lay, **meta)


def table_args(g: Group) -> tuple[Tensor, Tensor, int]:
    """``(tab, dyn, n_rows)``: the first three arguments of a multi-tensor kernel."""
    return g.tab, g.dyn if g.dyn is not None else g.tab, g.n_rows
