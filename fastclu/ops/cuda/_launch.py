"""Host side of the CUDA backend: device tables, scalars, streams and argument checks.

A launch covers every tensor of an op with one device table of int64 rows (layout in
``csrc/common.cuh``): ``[chunk_start, numel, dtype codes, tensor index, aux, ptr_0 .. ptr_K-1]``.
Tables are built on the host, copied once (pinned buffer, async on the current stream) and
cached by their exact content, so repeated steps over the same parameters skip the copy, and a
changed parameter set (new addresses or sizes) simply builds a new table.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from fastclu import _C

CHUNK: int = int(_C.CHUNK)
ROW_HEADER: int = int(_C.ROW_HEADER)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.uint8: 3}
CODE_PTR = 14  # operand is a pointer to one value (e.g. a 0-d step counter), not an array
CODE_NONE = 15
_CACHE_SIZE = 64


class Table(NamedTuple):
    """A device table and what the kernels need to walk it."""

    rows: Tensor | None  # int64 on the device (None when every tensor is empty)
    n_rows: int
    n_chunks: int
    ready: torch.cuda.Event | None = None  # recorded after the upload, on the stream that made it
    host: Tensor | None = None  # the pinned staging copy (kept: a captured graph replays the upload)

    @property
    def ptr(self) -> int:
        return 0 if self.rows is None else self.rows.data_ptr()


class HostScalar(NamedTuple):
    """A scalar as the extension takes it: a host value, or the address of a device fp32."""

    value: float
    ptr: int
    keep: Tensor | None  # keeps the device copy alive until the launch is queued

    @property
    def pair(self) -> tuple[float, int]:
        return (self.value, self.ptr)


_tables: OrderedDict[tuple, Table] = OrderedDict()
# Tables referenced by captured CUDA graphs: a replay reads them, so they are never freed.
_captured: list[Table] = []


def require_cuda(op: str, name: str, xs: Sequence[Tensor | None]) -> None:
    """Raise a clear error (instead of a crash in a kernel) for tensors not on a CUDA device."""
    for i, x in enumerate(xs):
        if x is not None and x.device.type != "cuda":
            raise ValueError(
                f"{op} (cuda backend): {name}[{i}] is on {x.device}; the cuda backend needs CUDA tensors "
                "(use backend='reference' for CPU tensors)"
            )


def stream_of(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Make ``device`` current so the extension's launches and grid queries target it."""
    with torch.cuda.device(device):
        yield


def scalar(x: float | Tensor, device: torch.device) -> HostScalar:
    """0-d device tensors stay on the device (read by the kernel, no host sync); CPU 0-d
    tensors and numbers are read on the host."""
    if isinstance(x, Tensor):
        if x.device.type != "cuda":
            return HostScalar(float(x), 0, None)
        t = x.detach().reshape(()).to(device=device, dtype=torch.float32)
        return HostScalar(0.0, t.data_ptr(), t)
    return HostScalar(float(x), 0, None)


def alloc(shape: int | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer a kernel fully overwrites comes from here (tests poison it by patching)."""
    return torch.empty(shape, dtype=dtype, device=device)


def n_chunks_of(numel: int) -> int:
    return (numel + CHUNK - 1) // CHUNK


def _signature(
    operands: Sequence[Sequence[Tensor | None] | None],
    units: Sequence[int] | None,
    aux: Sequence[int] | None,
    pointer_operands: Sequence[int],
) -> tuple:
    """Everything a table depends on, gathered with list comprehensions (the per-step cost of a
    cache hit: a few hundred ns per tensor and operand)."""
    main = operands[0]
    assert main is not None
    numels = tuple([t.numel() for t in main])
    ptrs = tuple(None if xs is None else tuple([0 if t is None else t.data_ptr() for t in xs]) for xs in operands)
    dtypes = tuple(
        None if xs is None or k in pointer_operands else tuple([None if t is None else t.dtype for t in xs])
        for k, xs in enumerate(operands)
    )
    return (numels, ptrs, dtypes, None if units is None else tuple(units), None if aux is None else tuple(aux),
            tuple(pointer_operands))  # fmt: skip


def _rows_of(op: str, sig: tuple) -> tuple[list[int], int, int]:
    numels, ptrs, dtypes, units, aux, pointer_operands = sig
    rows: list[int] = []
    start = 0
    n_rows = 0
    for i, numel in enumerate(numels):
        if numel == 0:
            continue
        codes = 0
        row_ptrs = []
        for k, kp in enumerate(ptrs):
            if kp is None or (k not in pointer_operands and dtypes[k][i] is None):
                code, ptr = CODE_NONE, 0
            elif k in pointer_operands:
                code, ptr = CODE_PTR, kp[i]
            else:
                code = DTYPE_CODES.get(dtypes[k][i])
                if code is None:
                    raise TypeError(
                        f"{op} (cuda backend): operand {k} of tensor {i} has unsupported dtype {dtypes[k][i]}"
                    )
                ptr = kp[i]
            codes |= code << (4 * k)
            row_ptrs.append(ptr)
        rows += [start, numel, codes, i, 0 if aux is None else int(aux[i]), *row_ptrs]
        start += n_chunks_of(numel) if units is None else int(units[i])
        n_rows += 1
    return rows, n_rows, start


def table_rows(
    op: str,
    operands: Sequence[Sequence[Tensor | None] | None],
    *,
    units: Sequence[int] | None = None,
    aux: Sequence[int] | None = None,
    pointer_operands: Sequence[int] = (),
) -> tuple[list[int], int, int]:
    """Host content of a table: ``(flat int64 rows, number of rows, number of chunks)``.

    ``operands`` are K lists aligned with operand 0 (or None = absent). Tensors with no
    elements get no row. ``units[i]`` overrides the number of chunks of tensor ``i`` (the
    row-norm kernel walks rows instead of chunks); ``aux[i]`` is a per-tensor int.
    """
    if len(operands) > 15:
        raise ValueError(f"{op}: at most 15 operands per table, got {len(operands)}")
    return _rows_of(op, _signature(operands, units, aux, pointer_operands))


def build_table(
    op: str,
    operands: Sequence[Sequence[Tensor | None] | None],
    device: torch.device,
    *,
    units: Sequence[int] | None = None,
    aux: Sequence[int] | None = None,
    pointer_operands: Sequence[int] = (),
) -> Table:
    """The device table of :func:`table_rows`, from the cache when an identical one exists.

    The cache key is the tables' inputs (sizes, addresses, dtypes), so a hit costs no row
    building and no upload. A cached table may have been uploaded on another stream: the
    current stream waits for that upload's event (outside graph capture; torch.cuda.graph
    synchronizes before capturing, so a table built by the warm-up call is complete). Tables
    used while capturing are kept forever (a replay reads them).
    """
    if len(operands) > 15:
        raise ValueError(f"{op}: at most 15 operands per table, got {len(operands)}")
    sig = _signature(operands, units, aux, pointer_operands)
    capturing = torch.cuda.is_current_stream_capturing()
    key = (device.index, sig)
    table = _tables.get(key)
    if table is not None:
        _tables.move_to_end(key)
        if not capturing and table.ready is not None:
            stream = torch.cuda.current_stream(device)
            stream.wait_event(table.ready)
            table.rows.record_stream(stream)  # an eviction must not free it under this stream's kernels
    else:
        rows, n_rows, n_chunks = _rows_of(op, sig)
        if n_rows == 0:
            return Table(None, 0, 0)
        host = torch.tensor(rows, dtype=torch.int64).pin_memory()
        dev_rows = host.to(device, non_blocking=True)
        ready = None
        if not capturing:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        table = Table(dev_rows, n_rows, n_chunks, ready, host)
        if not capturing:  # a captured upload only happens at replay: useless to eager calls
            _tables[key] = table
            if len(_tables) > _CACHE_SIZE:
                _tables.popitem(last=False)
    if capturing:
        _captured.append(table)
    return table


def clear_table_cache() -> None:
    """Drop every cached device table (they are rebuilt on demand)."""
    _tables.clear()
