"""Backend registry and per-call dispatch for the multi-tensor ops.

Each backend lives in ``fastclu.ops.<name>`` and registers its implementations with
:func:`register`. Backend modules are imported lazily, on the first call that needs them,
so ``import fastclu`` never imports triton (``TRITON_INTERPRET`` must be set before that).
Selection: ``backend=`` argument > ``FASTCLU_BACKEND`` environment variable > automatic
(CUDA tensors: the available kernel backend with the strongest verification record,
``fastclu._verification``; anything else: ``reference``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable

import torch

BACKENDS = ("reference", "triton", "cuda")

_impls: dict[str, dict[str, Callable]] = {}
_loaded: dict[str, str | None] = {}  # backend -> None if importable, else the reason


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the implementation of ``op`` on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn: Callable) -> Callable:
        _impls.setdefault(op, {})[backend] = fn
        return fn

    return deco


def _unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run at all here (None when it can)."""
    if backend == "reference":
        return None
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except Exception as e:  # noqa: BLE001 - a broken install raises anything; report, don't crash
            return f"triton not importable ({e.__class__.__name__}: {e})"
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
        return None
    if backend == "cuda" and os.environ.get("FASTCLU_CUDA_ON_CPU", "").strip() == "1":
        from fastclu.ops import _cuda_cpu_mode  # test mode: csrc kernels on CPU tensors (csrc/cpu/)

        return _cuda_cpu_mode.enable_for_process()
    if backend == "cuda":
        try:
            importlib.import_module("fastclu._C")
        except ImportError as e:
            return f"extension not built (fastclu._C: {e})"
        if not torch.cuda.is_available():
            return "extension built, but no CUDA device"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _load(backend: str) -> str | None:
    if backend not in _loaded:
        reason = _unavailable_reason(backend)
        if reason is None:
            try:
                importlib.import_module(f"fastclu.ops.{backend}")
            except Exception as e:  # noqa: BLE001 - surfaced as the backend's unavailability reason
                reason = f"fastclu.ops.{backend} failed to import ({e.__class__.__name__}: {e})"
        _loaded[backend] = reason
    return _loaded[backend]


def backends() -> dict[str, str | None]:
    """Map each backend name to ``None`` if it is usable here, else the reason it is not."""
    return {b: _load(b) for b in BACKENDS}


def _auto(op: str, device_type: str) -> str:
    if device_type == "cuda":
        from fastclu._verification import auto_order  # GPU-verified first, then the stronger CPU evidence

        for b in auto_order(("cuda", "triton")):
            if _load(b) is None and b in _impls.get(op, {}):
                return b
    return "reference"


@torch.compiler.assume_constant_result
def choose(op: str, backend: str | None, device_type: str) -> str:
    """Name of the backend that runs ``op`` (raises if it is unavailable or lacks the op).

    ``device_type`` (``"cuda"``, ``"cpu"``, ...) is that of the op's main tensors; it drives
    automatic choice. Under ``torch.compile`` the choice is a constant of the traced graph (it depends only on
    the environment, the argument and the device), so loading a backend never breaks a graph.
    """
    name = backend or os.environ.get("FASTCLU_BACKEND") or "auto"
    if name == "auto":
        name = _auto(op, device_type)
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    reason = _load(name)
    if reason is not None:
        raise RuntimeError(f"fastclu backend {name!r} is unavailable: {reason}")
    if name not in _impls.get(op, {}):
        raise NotImplementedError(f"op {op!r} has no {name!r} implementation")
    return name


def implementation(op: str, backend: str) -> Callable:
    """The registered implementation of ``op`` on ``backend`` (after :func:`choose`)."""
    return _impls[op][backend]


def resolve(op: str, backend: str | None, tensors: Iterable[torch.Tensor]) -> Callable:
    """The implementation of ``op`` for the chosen backend; ``tensors`` are the op's main tensors."""
    return implementation(op, choose(op, backend, device_type(tensors)))


def device_type(tensors: Iterable[torch.Tensor]) -> str:
    """Device type of the first tensor (``"cpu"`` for none): what automatic choice looks at."""
    first = next(iter(tensors), None)
    return first.device.type if first is not None else "cpu"
