"""First speed reading of the Triton ops: effective GB/s next to a device-to-device copy.

``python -m fastclu.ops.triton.bench [--numel 67108864] [--tensors 1] [--reps 20]``

Each op's bytes are the DESIGN floor (what it must read and write per element, fp32); the copy
is ``dst.copy_(src)`` measured in the same run, so the ratio is what to look at. Times are CUDA
event medians after a warm-up. Without a GPU it runs (slowly, on tiny sizes) under the
interpreter, only to check that it works.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import fastclu.ops as O


def _time(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Median seconds per call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        return statistics.median(ts)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run(numel: int, tensors: int, reps: int, device: torch.device) -> list[tuple[str, float, float]]:
    """(op, seconds, GB/s) rows; the first row is the copy baseline."""
    n = numel // tensors

    def lst(fill: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
        return [fill(n) for _ in range(tensors)]

    def rn(k: int) -> torch.Tensor:
        return torch.randn(k, device=device)

    def ru(k: int) -> torch.Tensor:
        return torch.rand(k, device=device) + 0.1

    p, g, g2, a, f, f2, buf = lst(rn), lst(rn), lst(rn), lst(rn), lst(ru), lst(ru), lst(rn)
    ea, es, steps = lst(rn), lst(ru), [torch.zeros((), device=device) for _ in range(tensors)]
    mask = O.ratio_mask(f, f2, 1.0, backend="triton")
    lr = torch.tensor(1e-3, device=device)
    src, dst = rn(numel), torch.empty(numel, device=device)
    total = n * tensors
    cases: list[tuple[str, int, Callable[[], object]]] = [
        ("copy (baseline)", 8, lambda: dst.copy_(src)),
        ("fisher_accumulate_", 12, lambda: O.fisher_accumulate_(f, g, 1.0, backend="triton")),
        ("ratio_mask", 8, lambda: O.ratio_mask(f, f2, 1.0, backend="triton")),
        ("topk_mask (4 passes)", 8 + 16, lambda: O.topk_mask(g, total // 100, backend="triton")),
        ("gram R=2", 8, lambda: O.gram([g, g2], backend="triton")),
        ("combine_step_ sgd R=1", 4 + 16, lambda: O.combine_step_(p, [g], {"momentum_buffer": buf}, lr=lr,
                                                                    momentum=0.9, backend="triton")),
        ("combine_step_ sgd R=2 mask", 8 + 16, lambda: O.combine_step_(
            p, [g, g2], {"momentum_buffer": buf}, lr=lr, momentum=0.9, mask=mask, coeffs=[-1.0, 1.0],
            backend="triton")),
        ("combine_step_ adamw R=1", 4 + 24, lambda: O.combine_step_(
            p, [g], {"exp_avg": ea, "exp_avg_sq": es, "step": steps}, rule="adamw", lr=lr, backend="triton")),
        ("lerp_sync_", 16, lambda: O.lerp_sync_(a, p, 0.5, backend="triton")),
        ("perturb_ anchor+backup", 16, lambda: O.perturb_(p, 0.01, anchor=a, backup=buf, backend="triton")),
        ("restore_", 8, lambda: O.restore_(p, buf, backend="triton")),
        ("fd_hvp_", 12, lambda: O.fd_hvp_(buf, g, g2, 0.01, backend="triton")),
        ("merge_stats", 16, lambda: O.merge_stats(p, a, f, f2, backend="triton")),
        ("merge_", 12, lambda: O.merge_(p, a, 0.5, backend="triton")),
    ]  # fmt: skip
    rows = []
    for name, bpe, fn in cases:
        sec = _time(fn, reps, device)
        rows.append((name, sec, bpe * total / sec / 1e9))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=2**26)
    ap.add_argument("--tensors", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run(args.numel, args.tensors, args.reps, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"{name}: {args.numel} fp32 elements in {args.tensors} tensor(s)")
    base = rows[0][2]
    for op, sec, gbs in rows:
        print(f"{op:28s} {sec * 1e3:9.3f} ms {gbs:9.1f} GB/s {gbs / base:6.1%} of copy")


if __name__ == "__main__":
    main()
