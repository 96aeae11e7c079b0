"""The one timer: seconds per call, peak extra memory, and the copy roofline step."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

Step = Callable[[], object]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Step, device: torch.device, *, warmup: int, repeats: int) -> list[float]:
    """Seconds per call, ``repeats`` samples after ``warmup`` untimed calls.

    CUDA: each call bracketed by CUDA events on the current stream (launch overhead included,
    as a training step would pay it). CPU: ``time.perf_counter`` around each call.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        out = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def host_times(fn: Step, *, warmup: int, repeats: int) -> list[float]:
    """Host seconds per call (``time.perf_counter``, no device synchronisation): what the Python
    side of a step costs, whatever the device queues. Used with stubbed launches (``--host``)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _peak_extra(fn: Step, device: torch.device) -> int | None:
    """Bytes allocated by one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return int(peak)


def copy_step(nbytes: int, device: torch.device) -> Step:
    """A device-to-device copy moving ``nbytes`` in total (``nbytes / 2`` read + written)."""
    n = max(nbytes // 2 // 4, 1)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def steady_cpu_malloc() -> str:
    """Pin glibc's malloc thresholds for CPU timing; returns what was done (for the JSON meta).

    glibc adapts its mmap threshold to the sizes freed so far, so whichever implementation is
    timed first after large frees pays mmap + page faults on every call while the threshold
    settles (measured: up to 3x on ResNet-18 sizes, the order of the rows deciding the ratio).
    Fixed thresholds (mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD, which also turn the adaptation
    off) give every row the same allocator behaviour. No-op off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = None if libc is None else libc.mallopt
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return "not glibc: malloc thresholds left adaptive"
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok_mmap = mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
    ok_trim = mallopt(m_trim_threshold, 1 << 30)
    return f"mallopt M_MMAP_THRESHOLD=32 MiB ({'ok' if ok_mmap else 'refused'}), M_TRIM_THRESHOLD=1 GiB ({'ok' if ok_trim else 'refused'})"
