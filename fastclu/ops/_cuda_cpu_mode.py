"""CPU execution mode of the ``cuda`` backend: the csrc kernels, compiled by g++ into the test
module ``fastclu._C_cpu`` (``python csrc/cpu/build.py``), run on CPU tensors.

For testing only: the kernels' code runs against the reference with real barriers, warp
collectives and random block and thread orders (``csrc/cpu/cuda_shim.h``), but nothing about
GPU speed, coalescing, races between SMs or graph capture is shown by it. Not part of a wheel.

While the mode is on, the ``cuda`` backend's wrappers take CPU tensors, launch on host memory
with no stream (every launch completes before it returns), read 0-d CPU tensors through their
address (the kernels' device-scalar path) and treat CPU step counters as device counters.
Switch it on for a process with ``FASTCLU_CUDA_ON_CPU=1`` (read when the backend is first
loaded), or for a scope with :func:`enable`, which returns the function that undoes it.
"""

from __future__ import annotations

import contextlib
import importlib
import operator
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

import torch
from torch import Tensor

ENV = "FASTCLU_CUDA_ON_CPU"
MODULE = "fastclu._C_cpu"
_MISSING = object()
_active = False


def requested() -> bool:
    """True when ``FASTCLU_CUDA_ON_CPU=1`` asks for the mode for the whole process."""
    return os.environ.get(ENV, "").strip() == "1"


def load_extension() -> ModuleType:
    """``fastclu._C_cpu``, or ImportError saying how to build it."""
    try:
        return importlib.import_module(MODULE)
    except ImportError as e:
        raise ImportError(f"{MODULE} is not built ({e}); build it with: python csrc/cpu/build.py") from e


def unavailable_reason() -> str | None:
    """Why the mode cannot run here (None when it can)."""
    try:
        load_extension()
    except ImportError as e:
        return str(e)
    return None


def _import_backend(cpu: ModuleType) -> None:
    """Import ``fastclu.ops.cuda``; where ``fastclu._C`` is not built, the CPU module stands in
    for it during the import only (the wrappers bind ``_C`` at import time)."""
    if "fastclu.ops.cuda" in sys.modules:
        return
    import fastclu

    try:
        importlib.import_module("fastclu._C")
    except ImportError:
        sys.modules["fastclu._C"] = cpu
        fastclu._C = cpu
        try:
            importlib.import_module("fastclu.ops.cuda")
        finally:
            del sys.modules["fastclu._C"]
            del fastclu._C
        return
    importlib.import_module("fastclu.ops.cuda")


# --- the host-memory stand-ins for the wrappers' device helpers --------------------------------


_is_cpu = Tensor.is_cpu.__get__
_dtype = operator.attrgetter("dtype")


def require_cpu(op: str, name: str, xs: Sequence[Tensor | None]) -> None:
    try:
        if all(map(_is_cpu, xs)):  # one C-level pass, no Python per tensor
            return
    except TypeError:  # None entries: the loop below
        pass
    for i, x in enumerate(xs):
        if x is not None and x.device.type != "cpu":
            raise ValueError(
                f"{op} (cuda backend, CPU mode {ENV}=1): {name}[{i}] is on {x.device}; this mode runs the "
                "kernels on CPU tensors"
            )


def no_stream(device: torch.device) -> int:
    return 0


@contextlib.contextmanager
def host_device(device: torch.device) -> Iterator[None]:
    yield


def scalar(x: float | Tensor, device: torch.device):
    """0-d tensors are read by the kernel through their address, as device scalars are on a GPU."""
    from fastclu.ops.cuda._launch import HostScalar

    if isinstance(x, Tensor):
        t = x.detach().reshape(()).to(device="cpu", dtype=torch.float32).clone()
        return HostScalar(0.0, t.data_ptr(), t)
    return HostScalar(float(x), 0, None)


# Every tensor is on the CPU here, so the wrapper cannot tell a GPU run's "device" step counters
# from its "host" ones: device counters by default (step mode 3, advanced and read by the kernels), host
# counters (modes 0 and 1) when a test sets this.
HOST_STEP_COUNTERS = False


def step_source(
    steps: list[Tensor], found_inf: Tensor | None, dev: torch.device
) -> tuple[int, float, Tensor | None, bool]:
    """The combine wrapper's step-counter logic with CPU tensors standing for device tensors."""
    if not (all(map(_is_cpu, steps)) and set(map(_dtype, steps)) <= {torch.float32}):  # C-level passes
        for i, s in enumerate(steps):
            if s.device.type != "cpu" or s.dtype != torch.float32:
                raise TypeError(
                    f"state['step'][{i}] must be an fp32 CPU tensor in CPU mode, got {s.dtype} on {s.device}"
                )
    if HOST_STEP_COUNTERS:
        if found_inf is not None and float(found_inf.reshape(())) != 0.0:
            return 0, 1.0, None, True
        values = []
        for s in steps:
            s += 1
            values.append(float(s.reshape(())))
        if len(set(values)) <= 1:
            return 0, values[0] if values else 1.0, None, False
        return 1, 1.0, torch.tensor(values, dtype=torch.float32), False
    return 3, 1.0, None, False  # advanced by the call's own launch, as device counters are


# --- switching -----------------------------------------------------------------------------


def _swaps(cpu: ModuleType) -> list[tuple[object, str, object]]:
    """(owner, attribute or dict key, new value) for every name the mode replaces."""
    from fastclu import _registry
    from fastclu.ops.cuda import _launch, combine

    helpers = {"require_cuda": require_cpu, "stream_of": no_stream, "on_device": host_device,
               "scalar": scalar}  # fmt: skip
    missing = [f"_launch.{n}" for n in helpers if not hasattr(_launch, n)]
    missing += [] if hasattr(combine, "_step_source") else ["combine._step_source"]
    if missing:  # the wrappers changed: a silent partial switch would run device code paths
        raise RuntimeError(f"CPU mode: fastclu.ops.cuda has no {missing}; update fastclu/ops/_cuda_cpu_mode.py")
    originals = {name: getattr(_launch, name) for name in helpers}
    swaps: list[tuple[object, str, object]] = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "fastclu.ops.cuda" or name.startswith("fastclu.ops.cuda.")):
            continue
        if hasattr(mod, "_C"):
            swaps.append((mod, "_C", cpu))
        for attr, fn in helpers.items():
            if getattr(mod, attr, None) is originals[attr]:
                swaps.append((mod, attr, fn))
    swaps.append((combine, "_step_source", step_source))
    swaps.append((_registry._loaded, "cuda", None))
    return swaps


def enable() -> Callable[[], None]:
    """Switch the ``cuda`` backend to the CPU module; returns the function that switches it back."""
    global _active
    if _active:
        raise RuntimeError("the cuda backend's CPU mode is already on")
    cpu = load_extension()
    _import_backend(cpu)
    saved: list[tuple[object, str, object]] = []
    for owner, key, value in _swaps(cpu):
        if isinstance(owner, dict):
            saved.append((owner, key, owner.get(key, _MISSING)))
            owner[key] = value
        else:
            saved.append((owner, key, getattr(owner, key, _MISSING)))
            setattr(owner, key, value)
    _active = True

    def undo() -> None:
        global _active
        for owner, key, old in reversed(saved):
            if isinstance(owner, dict):
                if old is _MISSING:
                    owner.pop(key, None)
                else:
                    owner[key] = old
            elif old is _MISSING:
                delattr(owner, key)
            else:
                setattr(owner, key, old)
        _active = False

    return undo


def active() -> bool:
    return _active


def enable_for_process() -> str | None:
    """The registry's hook for ``FASTCLU_CUDA_ON_CPU=1``: switch the mode on for good, or say why not."""
    if _active:
        return None
    reason = unavailable_reason()
    if reason is None:
        enable()
    return reason
