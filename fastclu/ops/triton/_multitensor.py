"""Host side of the multi-tensor launches: device tables of addresses, sizes and block maps.

One launch covers every tensor of a (dtype signature) group. The kernel finds its work through
a table built here and copied to the device once: per tensor the address of each operand, its
element count and its index in the caller's list; per program the tensor it works on and the
element offset where its chunk starts. Tables are cached on (device, chunk, dtypes, addresses,
sizes): a table depends on nothing else, so a hit is always correct, and a changed parameter
set (new tensors, freed and reallocated storage) simply misses and builds a new one. A table
used during CUDA graph capture is pinned (never evicted): the graph reads it on every replay.
"""

from __future__ import annotations

import functools
import operator
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

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

_CACHE_SIZE = 64
_cache: OrderedDict[tuple, list[Group]] = OrderedDict()
# Tables used while a CUDA graph was being captured: the graph reads their device memory on every
# replay, so they must outlive any LRU eviction (freed, the memory would be reused under the graph).
_pinned: dict[tuple, list[Group]] = {}


@dataclass(frozen=True)
class Group:
    """One launch's worth of tensors (same dtype signature).

    ``ptrs``: int64 ``[n_operands, n_tensors]`` device addresses (0 for an absent operand);
    ``numel``/``index``/``rowlen``: int64 ``[n_tensors]`` (elements, list position,
    row length); ``blk_tensor``/``blk_start``: int64
    ``[n_blocks]`` (position in this group, first element); ``blk_global``: int64 ``[n_blocks]``,
    the block's rank in the global (tensor, offset) order over all groups. The first ``n_full``
    blocks are whole (no element past the tensor's end); ``align`` (bytes, a power of two <= 16)
    divides every address in the table.
    """

    def launches(self) -> list[tuple[int, int, bool]]:
        """``(first block, programs, EVEN)`` per launch: whole blocks unmasked, then the tails."""
        out = [(0, self.n_full, True), (self.n_full, self.n_blocks - self.n_full, False)]
        return [x for x in out if x[1] > 0]

    dtypes: tuple[torch.dtype | None, ...]
    members: tuple[int, ...]
    n_tensors: int
    n_blocks: int
    n_full: int
    align: int
    ptrs: Tensor
    numel: Tensor
    index: Tensor
    rowlen: Tensor
    blk_tensor: Tensor
    blk_start: Tensor
    blk_global: Tensor


def alloc(shape: tuple[int, ...] | int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialised output/scratch memory for the kernels (every element gets written).

    One indirection so tests can swap in a poisoning allocator and catch unwritten elements.
    """
    return torch.empty(shape, dtype=dtype, device=device)


def tl_dtype(dt: torch.dtype | None) -> tl.dtype:
    # An absent operand still needs some constexpr type; its pointer is never dereferenced.
    return tl.float32 if dt is None else TL_DTYPE[dt]


def groups(
    operands: Sequence[Sequence[Tensor] | None], chunk: int = BLOCK, *, rows: bool = False
) -> tuple[list[Group], int]:
    """Group aligned operand lists by dtype signature and build (or fetch) their tables.

    operands: lists aligned with ``operands[0]`` (None for an absent operand). The first list
    drives the block map: empty tensors get no block. With ``rows=True`` blocks never straddle
    a row (dim 0 of ``operands[0][i]``; ndim <= 1 is one row): ``blk_start`` is then the flat
    offset of the chunk and every chunk starts ``k * chunk`` elements into its row.
    Returns the groups and the total number of blocks.
    """
    main = operands[0]
    n = len(main)
    dev = main[0].device if n else torch.device("cpu")
    # the key is rebuilt every call: C-level map()s keep it to ~0.1 us per tensor and operand
    sig = list(zip(*[[None] * n if op is None else map(_dtype, op) for op in operands]))
    key = (
        str(dev), chunk, rows, tuple(sig),
        tuple(None if op is None else tuple(map(Tensor.data_ptr, op)) for op in operands),
        tuple(map(_shape, main)),
    )  # fmt: skip
    capturing = _capturing(dev)
    hit = _cache.get(key)
    if hit is None:
        hit = _pinned.get(key)
    if hit is not None:
        _remember(key, hit)
        if capturing:
            _pinned[key] = hit
        return hit, _total(hit)
    if capturing:
        # building copies the table host -> device, which a capturing stream refuses (and a replay
        # could not repeat): the table must exist before capture, as torch's own warm-up advice says
        raise RuntimeError(
            "fastclu triton: no device table for these tensors yet and the stream is capturing a CUDA "
            "graph; run the op once on the same tensors before capturing (warm-up)"
        )
    out = _build(operands, sig, chunk, rows, dev)
    _remember(key, out)
    return out, _total(out)


def _remember(key: tuple, gs: list[Group]) -> None:
    _cache[key] = gs
    _cache.move_to_end(key)
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)


def _capturing(dev: torch.device) -> bool:
    return dev.type == "cuda" and torch.cuda.is_current_stream_capturing()


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


_dtype = operator.attrgetter("dtype")
_shape = operator.attrgetter("shape")


def _total(gs: list[Group]) -> int:
    return sum(g.n_blocks for g in gs)


def _row_len(t: Tensor) -> int:
    return t.numel() // t.shape[0] if t.dim() >= 2 and t.shape[0] > 0 else t.numel()


def _blocks(t: Tensor, chunk: int, rows: bool) -> list[int]:
    n = t.numel()
    if n == 0:
        return []
    if not rows:
        return list(range(0, n, chunk))
    ln = _row_len(t)
    per_row = range(0, ln, chunk)
    return [r * ln + c for r in range(n // ln) for c in per_row]


def _build(operands, sig, chunk: int, rows: bool, dev: torch.device) -> list[Group]:
    main = operands[0]
    order: dict[tuple, list[int]] = {}
    for i, s in enumerate(sig):
        order.setdefault(s, []).append(i)
    # Global block rank follows list order (tensor index, then offset), whatever the grouping:
    # the tie-break of topk_mask and any cross-group buffer rely on it.
    starts = [_blocks(t, chunk, rows) for t in main]
    first = [0] * len(main)
    acc = 0
    for i, st in enumerate(starts):
        first[i] = acc
        acc += len(st)
    out = []
    for s, members in order.items():
        ptrs = [[0 if op is None else op[i].data_ptr() for i in members] for op in operands]
        full, tail = [], []
        for j, i in enumerate(members):
            n = main[i].numel()
            for b, st in enumerate(starts[i]):
                # full blocks first: they run in a launch without bounds masks (vectorisable)
                (full if not rows and st + chunk <= n else tail).append((j, st, first[i] + b))
        bt, bs, bg = ([e[c] for e in full + tail] for c in range(3))
        # the largest power of two (<= 16 bytes) dividing every address: an alignment hint
        # that holds by construction
        align = 16
        for row in ptrs:
            for p in row:
                if p:
                    align = min(align, p & -p)
        nt, nb, no = len(members), len(bt), len(operands)
        segments = [
            [v for row in ptrs for v in row], [main[i].numel() for i in members], list(members),
            [_row_len(main[i]) for i in members], bt, bs, bg,
        ]  # fmt: skip
        # Each segment padded to an even length: every sub-table then starts 16-byte aligned, so
        # Triton's pointer-alignment specialisation does not vary with the parity of nt / nb
        # (which would compile a new kernel variant when the parameter set changes).
        flat, at = [], []
        for seg in segments:
            at.append(len(flat))
            flat += seg + [0] * (len(seg) % 2)
        dv = torch.tensor(flat, dtype=torch.int64).to(dev)
        sl = [dv[a : a + len(seg)] for a, seg in zip(at, segments)]
        out.append(
            Group(
                dtypes=s, members=tuple(members), n_tensors=nt, n_blocks=nb, n_full=len(full), align=align,
                ptrs=sl[0].view(no, nt), numel=sl[1], index=sl[2], rowlen=sl[3], blk_tensor=sl[4],
                blk_start=sl[5], blk_global=sl[6],
            )
        )  # fmt: skip
    return out


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
def operand_ptr(ptrs, n_tensors, row: tl.constexpr, t, DT: tl.constexpr, ALIGN: tl.constexpr = 1):
    """Address of operand ``row`` of tensor ``t`` as a typed pointer (``ALIGN``: known byte alignment)."""
    ptr = tl.load(ptrs + row * n_tensors + t).to(tl.pointer_type(DT))
    if ALIGN > 1:
        # on the pointer itself: the compiler's alignment analysis does not see through int_to_ptr
        ptr = tl.multiple_of(ptr, ALIGN)
    return ptr


@helper
def block_info(blk_tensor, blk_start, numel, pid, BLOCK: tl.constexpr, EVEN: tl.constexpr = False):
    """(tensor position, 64-bit element offsets, in-bounds mask) of program ``pid``.

    Blocks start at multiples of BLOCK; with ``EVEN`` the block is known to be whole and the
    mask is a constant (so loads and stores can be vectorised).
    """
    t = tl.load(blk_tensor + pid)
    start = tl.multiple_of(tl.load(blk_start + pid), BLOCK)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    m = tl.full([BLOCK], 1, tl.int1) if EVEN else offs < tl.load(numel + t)
    return t, offs, m


def launch(kernel, g: Group, *args, **meta) -> None:
    """Run ``kernel`` over group ``g``: whole blocks (``EVEN=True``), then the tail blocks.

    The kernel takes ``blk0`` (its first block) after ``args`` and the constexprs ``EVEN`` and
    ``ALIGN`` (the group's address alignment) besides ``meta``.
    """
    for blk0, n, even in g.launches():
        kernel[(n,)](*args, blk0, EVEN=even, ALIGN=g.align, **meta)
