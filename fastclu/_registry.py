"""Backend registry and per-call dispatch for the multi-tensor ops.

Each backend lives in ``fastclu.ops.<name>`` and registers its implementations with
:func:`register`. Backend modules are imported lazily, on the first call that needs them,
so ``import fastclu`` never imports triton (``TRITON_INTERPRET`` must be set before that).
Selection: ``backend=`` argument > ``FASTCLU_BACKEND`` environment variable > automatic
(CUDA tensors: ``cuda`` if the extension is built, else ``triton``; anything else: ``reference``).
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
        except Exception as e:  # ImportError, or a broken install
            return f"triton not importable ({e.__class__.__name__}: {e})"
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
        return None
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
            except Exception as e:
                reason = f"fastclu.ops.{backend} failed to import ({e.__class__.__name__}: {e})"
        _loaded[backend] = reason
    return _loaded[backend]


def backends() -> dict[str, str | None]:
    """Map each backend name to ``None`` if it is usable here, else the reason it is not."""
    return {b: _load(b) for b in BACKENDS}


def _auto(op: str, device: torch.device) -> str:
    if device.type == "cuda":
        for b in ("cuda", "triton"):
            if _load(b) is None and b in _impls.get(op, {}):
                return b
    return "reference"


def resolve(op: str, backend: str | None, tensors: Iterable[torch.Tensor]) -> Callable:
    """Return the implementation of ``op`` for the chosen backend.

    ``tensors`` are the op's main tensors; the first one's device drives automatic choice.
    """
    name = backend or os.environ.get("FASTCLU_BACKEND") or "auto"
    if name == "auto":
        first = next(iter(tensors), None)
        name = _auto(op, first.device if first is not None else torch.device("cpu"))
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    reason = _load(name)
    if reason is not None:
        raise RuntimeError(f"fastclu backend {name!r} is unavailable: {reason}")
    fn = _impls.get(op, {}).get(name)
    if fn is None:
        raise NotImplementedError(f"op {op!r} has no {name!r} implementation")
    return fn
