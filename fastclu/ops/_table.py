"""The multi-tensor tables of both kernel backends: one layout, one builder, one cache.

A fused launch covers many tensors. Its kernel finds its work through a device table with one
int64 row per non-empty tensor (``csrc/common.cuh`` reads the same layout)::

    [chunk_start, numel, dtype codes, tensor index, aux, rank0, ptr_0 .. ptr_{K-1}]

- ``chunk_start``: chunks of the rows before this one in the table. A program finds its row by
  a binary search over this column (last row with ``chunk_start <= chunk``): O(tensors) memory,
  no per-chunk map. With ``split_tails`` (Triton) it counts only *whole* chunks: those run in an
  unmasked launch (``EVEN``), and each tensor's partial last chunk runs in a second launch whose
  program ``q`` takes row ``tails[q]`` (the row indices of tensors with a tail, stored right after
  the rows).
- ``dtype codes``: 4 bits per operand (:data:`DTYPE_CODES`, :data:`CODE_PTR`, :data:`CODE_NONE`).
- ``tensor index``: position in the caller's list; ``aux``: a per-tensor int given by the op
  (row length for the row-wise ops).
- ``rank0``: the global rank of the row's first chunk in the caller's (tensor, offset) order over
  every table of the call, for cross-table buffers of partials and ordered tie-breaks.
- ``ptr_k``: the address of operand ``k``, 0 when absent. For a *per-step* operand (declared by
  the op in ``dynamic``: gradients, freshly allocated outputs) the slot holds ``-(1 + i)``
  instead, and the address is ``dyn[i]`` with ``i = row * n_dyn + slot``: a small separate
  pointer array, re-uploaded only when those addresses change.

Tables are cached on what is stable: sizes, dtypes, the addresses of the non-dynamic operands
(params, state) and the mode. A step whose gradients moved (``zero_grad(set_to_none=True)``, a
stashed role) hits the cache and only re-uploads its pointer array; a changed parameter set
(new tensors, freed and reallocated storage) misses and builds. Host work is vectorised
(numpy over tensors) after one C-level pass per operand list collecting addresses and dtypes.

CUDA graphs: a table (and pointer array) used while a stream captures is pinned (never freed:
a replay reads it); building or uploading during capture is refused with a clear error, since a
host-to-device copy cannot be captured: run the op once on the same tensors first (warm-up).

:func:`stats` counts builds, hits and pointer uploads (for tests and benchmarks).
"""

from __future__ import annotations

import contextlib
import operator
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

HEADER = 6
COL_START, COL_NUMEL, COL_CODES, COL_INDEX, COL_AUX, COL_RANK = range(HEADER)
MAX_OPERANDS = 15  # 4-bit codes of every operand fit one int64
DTYPE_CODES = {
    torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.uint8: 3,
    torch.float64: 4, torch.int32: 5, torch.int64: 6, torch.int16: 7, torch.int8: 8,
}  # fmt: skip
CUDA_CODES = frozenset(range(4))  # what the C++ kernels read (csrc/common.cuh DType)
CODE_PTR = 14  # the operand is a pointer to one value (a 0-d step counter), not an array
CODE_NONE = 15
CACHE_SIZE = 64

_dtype = operator.attrgetter("dtype")
_data_ptr = Tensor.data_ptr
_numel = Tensor.numel


@dataclass
class Part:
    """One launch's table: the rows of some tensors (all of a call's for CUDA, one dtype
    signature for Triton), on the device.

    ``tab``: int64 ``[n_rows * (HEADER + n_ops) (+ n_tail)]``; ``dyn``: int64 ``[n_rows * n_dyn]``
    (or ``tab`` when no operand is per-step, so the kernel argument is always valid).
    ``n_chunks``: chunks (blocks) over the rows; with ``split_tails`` ``n_full`` whole ones then
    ``n_tail`` tails. ``align``: the largest power of two <= 16 bytes dividing every address.
    """

    members: tuple[int, ...]
    dtypes: tuple[torch.dtype | None, ...]
    n_rows: int
    n_ops: int
    n_chunks: int
    n_full: int
    n_tail: int
    tab: Tensor | None
    host: Tensor | None  # the staging copy of ``tab`` (kept: a captured upload replays from it)
    stable_align: int
    dyn_slots: np.ndarray  # int64 [n_rows * n_dyn]: flat positions (slot * n + member) of dyn
    dyn_mask: int = 0  # bit k: operand k is per-step (its slot indexes dyn)
    dyn: Tensor | None = None
    align: int = 16
    ready: object = None  # CUDA event recorded after the last upload

    @property
    def n_tensors(self) -> int:
        return self.n_rows

    @property
    def n_blocks(self) -> int:
        return self.n_chunks


@dataclass
class Entry:
    """A cached set of tables for one call signature, and its current per-step pointers."""

    parts: list[Part]
    n_chunks: int  # over every part
    dyn_key: tuple | None = None
    pinned_dyn: list = field(default_factory=list)


_cache: OrderedDict[tuple, Entry] = OrderedDict()
_pinned: dict[tuple, Entry] = {}
# A memo (dict) owned by a caller that guarantees its stable operands do not change while the
# memo lives: see :func:`stable_operands`.
_MEMO: ContextVar[dict | None] = ContextVar("fastclu_table_memo", default=None)


@contextlib.contextmanager
def stable_operands(memo: dict) -> Iterator[None]:
    """Within the scope, calls look their tables up in ``memo`` by their shape of call only.

    For a caller that owns its stable operands (the optimizers' per-layout buckets: the same
    parameter, state and mask tensors, in the same lists, for as long as the layout lives; a
    changed parameter set builds a new layout and a new memo): the addresses and dtypes of the
    stable operands are then not re-read and re-hashed on every call. Per-step operands are
    handled as always (their addresses and dtypes are read per call). The memo keeps its tables
    alive; the caller keeps the tensors alive.
    """
    token = _MEMO.set(memo)
    try:
        yield
    finally:
        _MEMO.reset(token)


_stats = {"builds": 0, "hits": 0, "pointer_uploads": 0}


def stats() -> dict[str, int]:
    """Counts since :func:`reset_stats`: ``builds`` (stable tables built on a cache miss),
    ``hits`` (calls served by a cached table), ``pointer_uploads`` (per-step pointer arrays
    re-uploaded because their addresses changed)."""
    return dict(_stats)


def reset_stats() -> None:
    for k in _stats:
        _stats[k] = 0


def clear_cache() -> None:
    """Drop every cached table not pinned by a graph capture (they are rebuilt on demand)."""
    _cache.clear()


def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _dtypes_of(xs: Sequence[Tensor | None]) -> tuple:
    try:
        return tuple(map(_dtype, xs))
    except AttributeError:  # None entries: an operand absent for some tensors
        return tuple([None if x is None else x.dtype for x in xs])


def _ptrs_of(xs: Sequence[Tensor | None]) -> tuple:
    try:
        return tuple(map(_data_ptr, xs))
    except TypeError:
        return tuple([0 if x is None else x.data_ptr() for x in xs])


def get(
    op: str,
    operands: Sequence[Sequence[Tensor | None] | None],
    device: torch.device,
    *,
    chunk: int,
    split_tails: bool = False,
    by_dtype: bool = False,
    dynamic: Sequence[int] = (),
    pointer_operands: Sequence[int] = (),
    units: Sequence[int] | None = None,
    aux: Sequence[int] | None = None,
    codes: frozenset[int] | None = None,
    keep_empty: bool = False,
) -> Entry:
    """The tables of one call (cached), with this call's per-step pointers uploaded.

    operands: K <= 15 lists aligned with ``operands[0]`` (None: absent), which gives the sizes;
    tensors with no elements get no row. ``dynamic``: operand indices whose addresses change per
    step (not in the cache key; passed through the pointer array). ``pointer_operands``: operands
    that are pointers to one value (code :data:`CODE_PTR`). ``units[i]`` replaces tensor ``i``'s
    chunk count (row-wise ops: its rows); ``aux[i]``: the row's aux column. ``by_dtype``: one
    part per dtype signature (Triton's constexpr dtypes), else one part. ``codes``: the dtype
    codes the kernels accept (others raise TypeError naming the operand). ``keep_empty``: empty
    tensors get a row too (with no chunks; a search never lands on one), for per-tensor work such
    as Triton's AdamW step counters.
    """
    if len(operands) > MAX_OPERANDS:
        raise ValueError(f"{op}: at most {MAX_OPERANDS} operands per table, got {len(operands)}")
    main = operands[0]
    assert main is not None
    dyn_set = frozenset(k for k in dynamic if operands[k] is not None)
    memo = _MEMO.get()
    mkey = None
    if memo is not None:
        mkey = (op, str(device), chunk, split_tails, by_dtype, keep_empty, tuple(pointer_operands),
                tuple([xs is None for xs in operands]), tuple([(k, _dtypes_of(operands[k])) for k in sorted(dyn_set)]),
                None if units is None else tuple(units), None if aux is None else tuple(aux))  # fmt: skip
        hit = memo.get(mkey)
        if hit is not None:
            _stats["hits"] += 1
            return _finish(op, operands, hit[0], hit[1], device, dyn_set, capturing(device))
    sig = tuple(None if xs is None else _dtypes_of(xs) for xs in operands)
    stable = tuple(None if xs is None or k in dyn_set else _ptrs_of(xs) for k, xs in enumerate(operands))
    key = (str(device), chunk, split_tails, by_dtype, keep_empty, tuple(sorted(dyn_set)), tuple(pointer_operands),
           tuple(map(_numel, main)), sig, stable, None if units is None else tuple(units),
           None if aux is None else tuple(aux))  # fmt: skip
    cap = capturing(device)
    entry = _cache.get(key)
    if entry is not None:  # the common case: one more hash of the key, no insertion
        _stats["hits"] += 1
        _cache.move_to_end(key)
    else:
        entry = _pinned.get(key)
        if entry is None:
            if cap:
                raise RuntimeError(
                    f"fastclu {op}: no device table for these tensors yet and the stream is capturing a CUDA "
                    "graph; run the op once on the same tensors before capturing (warm-up)"
                )
            entry = _build(op, operands, key, device, dyn_set, codes)
            _stats["builds"] += 1
        else:
            _stats["hits"] += 1
        _cache[key] = entry
        if len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    if memo is not None:
        memo[mkey] = (entry, key)
    return _finish(op, operands, entry, key, device, dyn_set, cap)


def _finish(
    op: str, operands: Sequence, entry: Entry, key: tuple, device: torch.device, dyn_set: frozenset, cap: bool
) -> Entry:
    """This call's per-step pointers, capture pinning and stream ordering for a found table."""
    if dyn_set:
        dkey = tuple(_ptrs_of(operands[k]) for k in sorted(dyn_set))
        if dkey != entry.dyn_key:
            if cap:
                raise RuntimeError(
                    f"fastclu {op}: the per-step operands (e.g. gradients) moved since the warm-up and the "
                    "stream is capturing a CUDA graph; capture with the tensors the warm-up call used"
                )
            _upload_dyn(entry, dkey, device)
    if cap:
        _pinned[key] = entry
        entry.pinned_dyn.append([p.dyn for p in entry.parts])
    elif device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        for p in entry.parts:
            if p.ready is not None:
                stream.wait_event(p.ready)  # uploaded on another stream: wait for its copy
                # and an eviction (or a re-upload) must not free them under this stream's kernels
                p.tab.record_stream(stream)
                if p.dyn is not None:
                    p.dyn.record_stream(stream)
    return entry


def _codes_of(op: str, sig: tuple, pointer_operands: tuple, n: int, allowed: frozenset | None) -> np.ndarray:
    codes = np.zeros(n, dtype=np.int64)
    ok = DTYPE_CODES.keys() if allowed is None else {d for d, c in DTYPE_CODES.items() if c in allowed}
    for k, dts in enumerate(sig):
        if dts is None:
            c = np.full(n, CODE_NONE, dtype=np.int64)
        elif k in pointer_operands:
            c = np.array([CODE_NONE if d is None else CODE_PTR for d in dts], dtype=np.int64).reshape(n)
        else:
            bad = [i for i, d in enumerate(dts) if d is not None and d not in ok]
            if bad:
                raise TypeError(f"{op}: operand {k} of tensor {bad[0]} has unsupported dtype {dts[bad[0]]}")
            c = np.array([CODE_NONE if d is None else DTYPE_CODES[d] for d in dts], dtype=np.int64).reshape(n)
        codes |= c << (4 * k)
    return codes


def _align(ptrs: np.ndarray) -> int:
    nz = ptrs[ptrs > 0]
    if nz.size == 0:
        return 16
    return int(min(16, int(np.min(nz & -nz))))


def _build(op: str, operands, key: tuple, device: torch.device, dyn_set: frozenset, allowed) -> Entry:
    chunk, split, by_dtype, keep_empty, _, pointer_operands, numels, sig, stable, units, aux = key[1:]
    n, K = len(numels), len(operands)
    numel = np.array(numels, dtype=np.int64).reshape(n)
    codes = _codes_of(op, sig, pointer_operands, n, allowed)
    keep = numel > 0
    blocks = np.array(units, dtype=np.int64) if units is not None else -(-numel // chunk)
    blocks = np.where(keep, blocks, 0)
    rank0 = np.cumsum(blocks) - blocks
    auxv = np.zeros(n, dtype=np.int64) if aux is None else np.array(aux, dtype=np.int64).reshape(n)
    addr = np.zeros((K, n), dtype=np.int64)
    for k, ps in enumerate(stable):
        if ps is not None:
            addr[k] = ps
    dyn_order = sorted(dyn_set)
    n_dyn = len(dyn_order)
    idx = np.arange(n, dtype=np.int64) if keep_empty else np.nonzero(keep)[0]
    if by_dtype and idx.size:
        _, first, inv = np.unique(codes[idx], return_index=True, return_inverse=True)
        member_sets = [idx[inv == g] for g in np.argsort(first, kind="stable")]
    else:
        member_sets = [idx]
    parts = []
    for m in member_sets:
        nr = int(m.size)
        rows = np.empty((nr, HEADER + K), dtype=np.int64)
        if split:
            full = numel[m] // chunk
            rows[:, COL_START] = np.cumsum(full) - full
            tails = np.nonzero(numel[m] % chunk)[0].astype(np.int64)  # empty tensors: 0 % chunk
            n_full, n_tail = int(full.sum()), int(tails.size)
            n_chunks = n_full + n_tail
        else:
            b = blocks[m]
            rows[:, COL_START] = np.cumsum(b) - b
            tails = np.zeros(0, dtype=np.int64)
            n_chunks = int(b.sum())
            n_full, n_tail = n_chunks, 0
        rows[:, COL_NUMEL] = numel[m]
        rows[:, COL_CODES] = codes[m]
        rows[:, COL_INDEX] = m
        rows[:, COL_AUX] = auxv[m]
        rows[:, COL_RANK] = rank0[m]
        rows[:, HEADER:] = addr[:, m].T
        for slot, k in enumerate(dyn_order):
            rows[:, HEADER + k] = -(1 + np.arange(nr, dtype=np.int64) * n_dyn + slot)
        # the dyn array, row-major [row, slot], gathered from the flat [slot, tensor] pointers
        dyn_slots = (np.arange(n_dyn, dtype=np.int64)[None, :] * n + m[:, None]).reshape(-1)
        flat = np.concatenate([rows.reshape(-1), tails])
        tab, host, ready = _upload(flat, device) if nr else (None, None, None)
        dts = tuple(None if s is None else s[m[0]] for s in sig) if nr else tuple(None for _ in sig)
        parts.append(Part(
            members=tuple(m.tolist()), dtypes=dts, n_rows=nr, n_ops=K, n_chunks=n_chunks, n_full=n_full,
            n_tail=n_tail, tab=tab, host=host, stable_align=_align(addr[:, m]), dyn_slots=dyn_slots,
            dyn_mask=sum(1 << k for k in dyn_order), align=_align(addr[:, m]), ready=ready,
        ))  # fmt: skip
    return Entry(parts, int(blocks.sum()))


def _upload(flat: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor, object]:
    host = torch.from_numpy(flat)
    if device.type != "cuda":
        return host.to(device), host, None
    host = host.pin_memory()
    dev = host.to(device, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(device))
    return dev, host, ready


def _upload_dyn(entry: Entry, dkey: tuple, device: torch.device) -> None:
    flat = np.array(dkey, dtype=np.int64).reshape(-1)
    for p in entry.parts:
        if p.n_rows == 0:
            continue
        vals = flat[p.dyn_slots]
        p.dyn, _, ev = _upload(np.ascontiguousarray(vals), device)
        if ev is not None:
            p.ready = ev
        p.align = min(p.stable_align, _align(vals))
    entry.dyn_key = dkey
    _stats["pointer_uploads"] += 1


def host_rows(part: Part) -> np.ndarray:
    """The rows of ``part`` as int64 ``[n_rows, HEADER + n_ops]`` on the host (for tests)."""
    return part.host[: part.n_rows * (HEADER + part.n_ops)].numpy().reshape(part.n_rows, HEADER + part.n_ops)


def host_tails(part: Part) -> np.ndarray:
    return part.host[part.n_rows * (HEADER + part.n_ops) :].numpy()


def resolved_ptrs(part: Part) -> np.ndarray:
    """int64 ``[n_ops, n_rows]``: every operand's address, per-step ones read from ``dyn`` (tests)."""
    rows = host_rows(part)[:, HEADER:].copy()
    if part.dyn is not None:
        d = part.dyn.cpu().numpy()
        neg = rows < 0
        rows[neg] = d[-rows[neg] - 1]
    return rows.T
