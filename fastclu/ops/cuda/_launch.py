"""Host side of the CUDA backend: device tables, scalars, streams and argument checks.

A launch covers every tensor of an op with one device table (layout and cache:
:mod:`fastclu.ops._table`; the kernels read it through ``csrc/common.cuh``): int64 rows
``[chunk_start, numel, dtype codes, tensor index, aux, rank0, ptr_0 .. ptr_K-1]`` plus the small
per-step pointer array ``dyn`` for the operands an op declares ``dynamic`` (gradients, fresh
outputs). Cached on the stable operands only, so repeated steps over the same parameters skip
the build and the copy; moved gradients re-upload only the pointer array.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from fastclu import _C
from fastclu.ops import _table

CHUNK: int = int(_C.CHUNK)
ROW_HEADER: int = _table.HEADER  # checked against _C.ROW_HEADER by tests/ops/test_tables.py
DTYPE_CODES = {d: c for d, c in _table.DTYPE_CODES.items() if c in _table.CUDA_CODES}
CODE_PTR = _table.CODE_PTR  # operand is a pointer to one value (e.g. a 0-d step counter), not an array
CODE_NONE = _table.CODE_NONE


class Table(NamedTuple):
    """A device table and what the kernels need to walk it."""

    rows: Tensor | None  # int64 on the device (None when every tensor is empty)
    n_rows: int
    n_chunks: int
    dyn_rows: Tensor | None = None  # the per-step pointer array (None: no per-step operand)

    @property
    def ptr(self) -> int:
        return 0 if self.rows is None else self.rows.data_ptr()

    @property
    def dyn(self) -> int:
        return 0 if self.dyn_rows is None else self.dyn_rows.data_ptr()

    @property
    def args(self) -> tuple[int, int, int, int]:
        """``(table, dyn, n_rows, n_chunks)``: the first arguments of every table entry point."""
        return self.ptr, self.dyn, self.n_rows, self.n_chunks


class HostScalar(NamedTuple):
    """A scalar as the extension takes it: a host value, or the address of a device fp32."""

    value: float
    ptr: int
    keep: Tensor | None  # keeps the device copy alive until the launch is queued

    @property
    def pair(self) -> tuple[float, int]:
        return (self.value, self.ptr)


_is_cuda = Tensor.is_cuda.__get__  # the C-level getter: one map per list


def require_cuda(op: str, name: str, xs: Sequence[Tensor | None]) -> None:
    """Raise a clear error (instead of a crash in a kernel) for tensors not on a CUDA device."""
    try:
        if all(map(_is_cuda, xs)):  # the common case: one C-level pass, no Python per tensor
            return
    except TypeError:  # None entries (an operand absent for some tensors): the loop below
        pass
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


def table_rows(
    op: str,
    operands: Sequence[Sequence[Tensor | None] | None],
    *,
    units: Sequence[int] | None = None,
    aux: Sequence[int] | None = None,
    pointer_operands: Sequence[int] = (),
    dynamic: Sequence[int] = (),
) -> tuple[list[int], int, int]:
    """Host content of a table: ``(flat int64 rows, number of rows, number of chunks)``.

    ``operands`` are K lists aligned with operand 0 (or None = absent). Tensors with no
    elements get no row. ``units[i]`` overrides the number of chunks of tensor ``i`` (the
    row-norm kernel walks rows instead of chunks); ``aux[i]`` is a per-tensor int. Per-step
    (``dynamic``) operands show as their ``-(1 + index into dyn)`` slots.
    """
    e = _table.get(op, operands, torch.device("cpu"), chunk=CHUNK, dynamic=dynamic, pointer_operands=pointer_operands,
                   units=units, aux=aux, codes=_table.CUDA_CODES)  # fmt: skip
    (p,) = e.parts
    if p.n_rows == 0:
        return [], 0, 0
    return _table.host_rows(p).reshape(-1).tolist(), p.n_rows, p.n_chunks


def build_table(
    op: str,
    operands: Sequence[Sequence[Tensor | None] | None],
    device: torch.device,
    *,
    units: Sequence[int] | None = None,
    aux: Sequence[int] | None = None,
    pointer_operands: Sequence[int] = (),
    dynamic: Sequence[int] = (),
) -> Table:
    """The device table of :func:`table_rows` (cached on the stable operands, see
    :mod:`fastclu.ops._table`), with this call's ``dynamic`` operand addresses in ``dyn``.

    A cached table may have been uploaded on another stream: the current stream waits for that
    upload's event (outside graph capture; torch.cuda.graph synchronizes before capturing, so a
    table built by the warm-up call is complete). Tables used while capturing are kept forever
    (a replay reads them); a capture that would need a build or a pointer upload is refused. Any
    device: the CPU execution mode's tables live in host memory, with the same builder and cache.
    """
    e = _table.get(op, operands, device, chunk=CHUNK, dynamic=dynamic, pointer_operands=pointer_operands, units=units,
                   aux=aux, codes=_table.CUDA_CODES)  # fmt: skip
    (p,) = e.parts
    if p.n_rows == 0:
        return Table(None, 0, 0)
    return Table(p.tab, p.n_rows, p.n_chunks, p.dyn)


def clear_table_cache() -> None:
    """Drop every cached device table (they are rebuilt on demand)."""
    _table.clear_cache()
