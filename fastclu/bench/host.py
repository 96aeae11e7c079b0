"""Host time per optimizer step with the kernel launches stubbed out (``fastclu bench --host``).

A fused kernel is worth little if the Python around it costs more than the kernel. This measures
that Python: each fastclu step runs its full host path (validation, tables, scalars, stash
bookkeeping) while every kernel launch is replaced by a counting no-op, at the lowest level so
it survives changes in the op layer:

- Triton: ``run`` of every ``KernelInterface`` class that defines it (``JITFunction``, the
  interpreter's ``InterpretedFunction``, ``Autotuner``, ``Heuristics``): ``kernel[grid](...)``
  ends in one of them.
- CUDA: every callable attribute of the ``fastclu._C`` extension module (the op code looks them
  up as ``_C.name`` at call time).

The torch rows (``torch.optim.AdamW`` fused and foreach) time torch's *real* CPU step on
one-element tensors, as many as the shape list has, so the kernel work is negligible and what is
left is torch's host path for that tensor count. fastclu rows come on the same footing
(``tensors="one_element"``) and on the real shapes (``tensors="shapes"``: tables see the real
sizes); any torch op fastclu's host path runs outside the stubbed kernels (scalar set-up, AMP
bookkeeping, ...) runs for real, so a ``shapes`` row includes that CPU compute: an upper bound. ``aten_ops`` counts the ATen ops
one step dispatches (an untimed step under a counting dispatch mode).

Without a GPU the triton rows run under ``TRITON_INTERPRET=1`` (the launches are stubbed, so
the interpreter never executes a kernel) and the cuda rows run the cuda backend's CPU execution
mode (``impl="fastclu[cuda-cpu-mode]"``, :mod:`fastclu.ops._cuda_cpu_mode`; the ``fastclu._C_cpu``
calls stubbed): the same wrappers with host stand-ins for streams and device tables, where the
tables are built afresh per call (no cache, no upload), so those rows over-state the GPU path's
table cost. CPU host times are no GPU host times; ratios between rows of one run
are what this compares.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from fastclu.bench.shapes import gpt2_shapes, resnet18_shapes
from fastclu.bench.timer import Step, host_times

HOST_SCHEMA_VERSION = 1
HOST_SHAPES: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "tiny200": lambda: [(1,)] * 200,
    "resnet18": resnet18_shapes,
    "gpt2_124m": gpt2_shapes,
}
HOST_CASES = ("adamw", "masked_clipped_2role", "amp", "fastslow", "perturb_restore")
HOST_BACKENDS = ("triton", "cuda")
LR, BETAS, EPS, WD, CLIP = 1e-3, (0.9, 0.999), 1e-8, 1e-2, 1.0
NOTE = (
    "Host microseconds per step. fastclu rows: the real host path on tensors of the listed shapes, every kernel "
    "launch stubbed (a counting no-op; 'launches' = launches per step), once on the listed shapes (tensors='shapes') "
    "and once on as many one-element tensors (tensors='one_element', the torch rows' footing); torch ops outside the "
    "kernels run for real on the CPU, so 'shapes' rows include their CPU compute and are upper bounds. torch rows: "
    "torch.optim.AdamW's REAL CPU step (fused=True or foreach=True) on as many one-element tensors as the shape "
    "list has (kernel work negligible; 'launches' not counted). On a machine without a GPU the triton path runs under TRITON_INTERPRET=1 and CPU host times stand "
    "in for GPU host times: compare rows of one run, not runs of different machines."
)

NOTE_CUDA = NOTE.replace(
    "REAL CPU step", "real step on the GPU (host time of its real, asynchronous launches)"
).replace(
    "On a machine without a GPU the triton path runs under TRITON_INTERPRET=1 and CPU host times stand in for GPU "
    "host times: compare rows of one run, not runs of different machines.",
    "Compare rows of one run, not runs of different machines.",
)


# --------------------------------------------------------------------------------------------
# Launch stubs
# --------------------------------------------------------------------------------------------
class LaunchCounter:
    """Counts the launches the stubs swallowed."""

    def __init__(self) -> None:
        self.count = 0


def _triton_launch_classes() -> list[type]:
    classes = []
    for mod, name in (
        ("triton.runtime.jit", "JITFunction"),
        ("triton.runtime.interpreter", "InterpretedFunction"),
        ("triton.runtime.autotuner", "Autotuner"),
        ("triton.runtime.autotuner", "Heuristics"),
    ):
        try:
            cls = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):  # absent in this triton version: nothing to stub there
            continue
        if "run" in vars(cls):
            classes.append(cls)
    return classes


@contextlib.contextmanager
def stubbed_launches() -> Iterator[LaunchCounter]:
    """Within the block, Triton kernel launches and ``fastclu._C`` calls do nothing but count."""
    counter = LaunchCounter()
    saved: list[tuple[object, str, object]] = []

    def noop(*args: object, **kwargs: object) -> None:
        counter.count += 1

    if "triton" in sys.modules or importlib.util.find_spec("triton") is not None:
        for cls in _triton_launch_classes():
            saved.append((cls, "run", vars(cls)["run"]))
            cls.run = lambda self, *a, **k: noop()  # type: ignore[method-assign]
    for ext in _extensions():
        for name in dir(ext):
            obj = getattr(ext, name)
            if not name.startswith("_") and callable(obj) and not isinstance(obj, type):
                saved.append((ext, name, obj))
                setattr(ext, name, noop)
    try:
        yield counter
    finally:
        for owner, name, obj in reversed(saved):
            setattr(owner, name, obj)


def _extensions() -> list[object]:
    """``fastclu._C`` and the CPU-mode module ``fastclu._C_cpu``, where they are built."""
    out = []
    for name in ("fastclu._C", "fastclu._C_cpu"):
        try:
            out.append(importlib.import_module(name))
        except ImportError:
            continue
    return out


@contextlib.contextmanager
def backend_scope(backend: str, device: torch.device) -> Iterator[None]:
    """The cuda backend without a GPU runs in its CPU execution mode (:mod:`fastclu.ops._cuda_cpu_mode`)."""
    from fastclu.ops import _cuda_cpu_mode

    if backend != "cuda" or device.type == "cuda" or _cuda_cpu_mode.active():
        yield
        return
    undo = _cuda_cpu_mode.enable()
    try:
        yield
    finally:
        undo()


class _AtenCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------
def _params(shapes: Sequence[Sequence[int]], device: torch.device) -> list[Tensor]:
    # Constant fills, not randn: the kernels are stubbed, so values only matter to the host-side
    # torch ops (finite, nonzero), and filling 124M elements must stay cheap.
    ps = [torch.full(tuple(s), 0.5, device=device).requires_grad_(True) for s in shapes]
    for p in ps:
        p.grad = torch.full_like(p, 1e-3)
    return ps


def _fastclu_adamw(params: list[Tensor], backend: str) -> Any:  # a fastclu.optim.AdamW
    from fastclu.optim import AdamW

    return AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, backend=backend)


def _two_role(params: list[Tensor], backend: str, scaler: Any = None) -> Step:
    """SFR-on-style step: a masked, stashed forget role and the live remain role, clipped."""
    from fastclu.ops.bits import pack_bits

    opt = _fastclu_adamw(params, backend)
    opt.set_mask([pack_bits(torch.ones(p.shape, dtype=torch.bool, device=p.device)) for p in params],
                 mode="grad", roles=["forget"])  # fmt: skip
    forget = [p.grad.clone() for p in params]
    remain = [p.grad for p in params]
    combine = {"forget": -1.0, "grad": 1.0}

    def step() -> None:
        # What a training loop does between the two backwards: stash one role (no copy).
        for p, g in zip(params, forget):
            p.grad = g
        opt.stash("forget")
        for p, g in zip(params, remain):
            p.grad = g
        if scaler is None:
            opt.step(combine=combine, clip=CLIP)
        else:
            scaler.step(opt, combine=combine, clip=CLIP)
            scaler.update()

    return step


def _scaler(params: list[Tensor]) -> Any:
    scaler = torch.amp.GradScaler(params[0].device.type, init_scale=2.0**10)
    scaler.scale(torch.ones((), device=params[0].device))  # creates the scale, as the first scaled loss does
    return scaler


def fastclu_step(case: str, params: list[Tensor], backend: str) -> Step:
    """One fastclu step of ``case`` on ``params`` (``.grad`` set) with ``backend``."""
    if case == "adamw":
        return _fastclu_adamw(params, backend).step
    if case == "masked_clipped_2role":
        return _two_role(params, backend)
    if case == "amp":
        return _two_role(params, backend, _scaler(params))
    if case == "fastslow":
        from fastclu.optim import FastSlow

        return FastSlow(_fastclu_adamw(params, backend), k=5, beta=0.5, backend=backend).step
    if case == "perturb_restore":
        from fastclu import ops

        backup = [torch.empty_like(p) for p in params]
        flat = [p.detach() for p in params]

        def step() -> None:
            ops.perturb_(flat, 0.05, backup=backup, seed=1234, backend=backend)
            ops.restore_(flat, backup, backend=backend)

        return step
    raise ValueError(f"case must be one of {HOST_CASES}, got {case!r}")


def torch_step(case: str, params: list[Tensor], impl: str) -> Step:
    """torch.optim.AdamW (``impl`` ``torch_fused`` or ``torch_foreach``); ``amp`` through a GradScaler."""
    kind = {"torch_fused": {"fused": True}, "torch_foreach": {"foreach": True}}[impl]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kind)
    if case != "amp":
        return opt.step
    scaler = _scaler(params)

    def step() -> None:
        scaler.step(opt)
        scaler.update()

    return step


# torch has no counterpart of these cases: its rows exist for adamw (the target's baseline) and amp.
TORCH_CASES = ("adamw", "amp")


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------
def _time_us(step: Step, warmup: int, repeats: int, row: dict[str, Any] | None = None) -> float:
    """Median microseconds per step; ``row["us_p10"]``: the 10th percentile (less hit by a loaded machine)."""
    times = sorted(host_times(step, warmup=warmup, repeats=repeats))
    if row is not None:
        row["us_p10"] = times[len(times) // 10] * 1e6
    return statistics.median(times) * 1e6


def _row(case: str, impl: str, shapes_name: str, shapes: list[tuple[int, ...]], tensors: str) -> dict[str, Any]:
    return {"case": case, "impl": impl, "shapes": shapes_name, "tensors": tensors, "n_tensors": len(shapes),
            "numel": sum(math.prod(s) for s in shapes), "us_per_step": None, "us_p10": None, "launches": None,
            "aten_ops": None, "error": None}  # fmt: skip


def _tensor_shapes(shapes_name: str, tensors: str) -> list[tuple[int, ...]]:
    shapes = HOST_SHAPES[shapes_name]()
    if tensors == "one_element":
        return [(1,)] * len(shapes)
    if tensors != "shapes":
        raise ValueError(f"tensors must be 'shapes' or 'one_element', got {tensors!r}")
    return shapes


def measure_fastclu(
    case: str, backend: str, shapes_name: str, device: torch.device, warmup: int, repeats: int, tensors: str = "shapes"
) -> dict[str, Any]:
    """One fastclu row: launches counted over one step, ATen ops over another, then the timing.

    ``tensors``: ``"shapes"`` (the listed shapes: tables and host-side torch ops see the real
    sizes) or ``"one_element"`` (as many one-element tensors: the footing of the torch rows).
    """
    shapes = _tensor_shapes(shapes_name, tensors)
    cpu_mode = backend == "cuda" and device.type != "cuda"
    row = _row(case, f"fastclu[{backend}{'-cpu-mode' if cpu_mode else ''}]", shapes_name, shapes, tensors)
    row["numel"] = sum(math.prod(s) for s in shapes)
    try:
        with backend_scope(backend, device), stubbed_launches() as launches:
            step = fastclu_step(case, _params(shapes, device), backend)
            step()  # first step: state creation, validation and table caches (not timed)
            before = launches.count
            step()
            row["launches"] = launches.count - before
            counter = _AtenCounter()
            with counter:
                step()
            row["aten_ops"] = counter.count
            row["us_per_step"] = _time_us(step, warmup, repeats, row)
    except Exception as e:  # noqa: BLE001 -- one failing row must not hide the others
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    return row


def measure_torch(
    case: str, impl: str, shapes_name: str, device: torch.device, warmup: int, repeats: int
) -> dict[str, Any]:
    """One torch row: the real step on one-element tensors, as many as ``shapes_name`` has."""
    shapes = _tensor_shapes(shapes_name, "one_element")
    row = _row(case, impl, shapes_name, shapes, "one_element")
    try:
        step = torch_step(case, _params(shapes, device), impl)
        step()
        counter = _AtenCounter()
        with counter:
            step()
        row["aten_ops"] = counter.count
        row["us_per_step"] = _time_us(step, warmup, repeats, row)
    except Exception as e:  # noqa: BLE001 -- one failing row must not hide the others
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    return row


def usable_host_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Kernel backends whose host path can run here, and why the others cannot."""
    from fastclu._registry import backends

    status = backends()
    use, skipped = [], {}
    for b in HOST_BACKENDS:
        if b == "cuda" and device.type != "cuda":
            from fastclu.ops import _cuda_cpu_mode

            reason = _cuda_cpu_mode.unavailable_reason()
            if reason is not None:
                skipped[b] = f"no CUDA device, and the CPU execution mode is not available: {reason}"
            else:
                use.append(b)
        elif status.get(b) is not None:
            skipped[b] = str(status[b])
        else:
            use.append(b)
    return use, skipped


def run_host(
    cases: Sequence[str],
    shape_lists: Sequence[str],
    device: torch.device,
    *,
    warmup: int = 3,
    repeats: int = 20,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every case x shape list x (usable kernel backends, torch fused/foreach where torch has the case).

    Each row gets ``vs_torch_fused_adamw``: its time over torch fused AdamW's plain step on the
    same tensor count (the issue's targets are stated against that step). fastclu rows come twice
    (``tensors``: ``one_element``, the torch rows' footing, and ``shapes``, the real sizes).
    """
    use, skipped = usable_host_backends(device)
    rows: list[dict[str, Any]] = []
    for shapes_name in shape_lists:
        block = []
        for case in cases:
            # tiny200's shapes are one-element tensors already: one fastclu row per backend there.
            kinds = ["shapes"] if shapes_name == "tiny200" else ["one_element", "shapes"]
            block += [measure_fastclu(case, b, shapes_name, device, warmup, repeats, t) for b in use for t in kinds]
            if case in TORCH_CASES:
                block += [measure_torch(case, i, shapes_name, device, warmup, repeats)
                          for i in ("torch_fused", "torch_foreach")]  # fmt: skip
        if "adamw" not in cases:  # the baseline every ratio is taken against
            block.append(measure_torch("adamw", "torch_fused", shapes_name, device, warmup, repeats))
        base = next(r["us_per_step"] for r in block if (r["case"], r["impl"]) == ("adamw", "torch_fused"))
        for r in block:
            r["vs_torch_fused_adamw"] = r["us_per_step"] / base if (r["us_per_step"] and base) else None
            log(format_row(r))
        rows += block
    return rows, skipped


def format_row(r: dict[str, Any]) -> str:
    if r["error"]:
        return f"{r['shapes']:10s} {r['tensors']:11s} {r['case']:20s} {r['impl']:22s} error: {r['error'][:80]}"
    ratio = f"{r['vs_torch_fused_adamw']:6.2f}x" if r.get("vs_torch_fused_adamw") else "      -"
    launches = "-" if r["launches"] is None else str(r["launches"])
    return (f"{r['shapes']:10s} {r['tensors']:11s} {r['case']:20s} {r['impl']:22s} {r['us_per_step']:10.1f} us/step  {ratio} torch fused "
            f"AdamW  launches {launches:>4s}  aten ops {r['aten_ops']}")  # fmt: skip


# --------------------------------------------------------------------------------------------
# CLI (called by ``fastclu bench --host``)
# --------------------------------------------------------------------------------------------
def _choose(flag: str, given: Sequence[str] | None, allowed: Sequence[str]) -> list[str]:
    if not given:
        return list(allowed)
    bad = [g for g in given if g not in allowed]
    if bad:
        raise ValueError(f"{flag}: unknown {bad[0]!r}; choose from {', '.join(allowed)}")
    return list(given)


def host_main(args: argparse.Namespace, command: str) -> int:
    """``fastclu bench --host [--host-cases ...] [--host-shapes ...] [--json PATH]``; 2 on bad arguments."""
    try:
        cases = _choose("--host-cases", args.host_cases, HOST_CASES)
        shape_lists = _choose("--host-shapes", args.host_shapes, list(HOST_SHAPES))
        for name, v, low in (("--warmup", args.warmup, 0), ("--repeats", args.repeats, 1)):
            if v is not None and v < low:
                raise ValueError(f"{name} must be >= {low}, got {v}")
        device = (
            torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
    except ValueError as e:
        print(f"fastclu bench --host: {e}", file=sys.stderr)
        return 2
    if device.type != "cuda" and "fastclu.ops.triton" not in sys.modules:
        # Read when the kernels are decorated (first import of the triton backend); the stubs keep
        # the interpreter from ever running a kernel.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from fastclu.bench.report import environment

    threads = torch.get_num_threads()
    if device.type != "cuda":
        # One thread: host paths are single-threaded, and idle OpenMP workers on a shared machine
        # would only add wake-up noise to every CPU op.
        torch.set_num_threads(1)
    try:
        rows, skipped = run_host(cases, shape_lists, device, warmup=3 if args.warmup is None else args.warmup,
                                 repeats=20 if args.repeats is None else args.repeats)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    note = NOTE if device.type != "cuda" else NOTE_CUDA
    doc = {"schema": HOST_SCHEMA_VERSION, "kind": "host", "note": note, "meta": environment(device, command),
           "skipped_backends": skipped, "rows": rows}  # fmt: skip
    for b, why in skipped.items():
        print(f"NOTE: backend {b} skipped: {why}")
    print("NOTE:", note)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"wrote {path}")
    return 0
