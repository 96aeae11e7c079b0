"""Backend registry and per-call dispatch for the multi-tensor ops.

Each backend lives in ``fastclu.ops.<name>`` and registers its implementations with
:func:`register`. Backend modules are imported lazily, on the first call that needs them,
so ``import fastclu`` never imports triton (``TRITON_INTERPRET`` must be set before that).
Selection: ``backend=`` argument > the innermost :func:`use_backend` scope (a context variable:
per thread / task, never the process environment) > ``FASTCLU_BACKEND`` environment variable >
automatic (CUDA tensors: the available kernel backend with the strongest verification record,
``fastclu._verification``; anything else: ``reference``).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from collections.abc import Callable, Iterable, Iterator

import torch

BACKENDS = ("reference", "triton", "cuda")

# Every op and its family: the one name under which everything about the op is found, i.e.
# ``fastclu/ops/<backend>/<family>.py`` for each backend, ``csrc/<family>.cu``,
# ``tests/ops/reference/test_ref_<family>.py`` and ``tests/ops/kernels/test_kernel_<family>.py``.
OPS: dict[str, str] = {
    "combine_step_": "combine",
    "fd_hvp_": "hvp",
    "fisher_accumulate_": "fisher",
    "gram": "gram",
    "lerp_sync_": "lerp",
    "merge_": "merge",
    "merge_stats": "merge",
    "perturb_": "perturb",
    "ratio_mask": "masks",
    "restore_": "perturb",
    "soup_coef_grads": "soup",
    "soup_combine_": "soup",
    "topk_mask": "masks",
}
FAMILIES: tuple[str, ...] = tuple(sorted(set(OPS.values())))

_impls: dict[str, dict[str, Callable]] = {}
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastclu_backend", default=None)
_loaded: dict[str, str | None] = {}  # backend -> None if importable, else the reason


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the implementation of ``op`` on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if op not in OPS:
        raise ValueError(f"op {op!r} is not declared in fastclu._registry.OPS")

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


@contextlib.contextmanager
def use_backend(backend: str | None) -> Iterator[None]:
    """Scoped backend override: ops called in the body without ``backend=`` run on ``backend``.

    ``backend`` is ``"auto"`` or one of :data:`BACKENDS`; ``None`` leaves selection as it is.
    The override is a context variable (the process environment is never touched), so it is
    local to the thread / asyncio task, nests, and is undone on exit, exceptions included. An
    explicit ``backend=`` argument still wins; ``FASTCLU_BACKEND`` is the lowest-priority default.
    Under ``torch.compile`` the choice is made while tracing (a constant of the graph).
    """
    if backend is None:
        yield
        return
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    token = _scoped.set(backend)
    try:
        yield
    finally:
        _scoped.reset(token)


def current_backend() -> str:
    """The backend name an op without ``backend=`` would ask for here (``"auto"`` when nothing is set)."""
    return _scoped.get() or os.environ.get("FASTCLU_BACKEND") or "auto"


@torch.compiler.assume_constant_result
def choose(op: str, backend: str | None, device_type: str) -> str:
    """Name of the backend that runs ``op`` (raises if it is unavailable or lacks the op).

    ``device_type`` (``"cuda"``, ``"cpu"``, ...) is that of the op's main tensors; it drives
    automatic choice. Under ``torch.compile`` the choice is a constant of the traced graph (it depends only on
    the argument, the :func:`use_backend` scope, the environment and the device), so loading a
    backend never breaks a graph.
    """
    name = backend or current_backend()
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
