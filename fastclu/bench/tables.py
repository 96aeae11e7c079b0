"""Host cost of the multi-tensor tables (``python -m fastclu.bench.tables``).

Times, on the host, what :mod:`fastclu.ops._table` does for an AdamW ``combine_step_`` table
(params, grads, exp_avg, exp_avg_sq, step counters) of a real model's shape list, as each
kernel backend asks for it (Triton: 1024-element blocks, whole blocks apart from tails, one
table per dtype; CUDA: 8192-element chunks, one table):

- ``miss``: a cache miss, the stable table built (vectorised host code) and copied;
- ``hit``: the same call again (cache key and pointer comparison only);
- ``moved``: a hit whose gradients moved (``zero_grad(set_to_none=True)``): the small per-step
  pointer array re-uploaded, no rebuild.

The tensors are one-element storages expanded to the shapes (sizes and distinct addresses are
all a table sees), so GPT-2 124M needs no memory; the tables go to host memory (CPU device):
a GPU run adds one host-to-device copy per miss or move. Times are medians in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

from fastclu.bench.shapes import gpt2_shapes, resnet18_shapes
from fastclu.ops import _table
from fastclu.ops.tables import TABLES, combine_operands

SHAPES: dict[str, Callable[[], list[tuple[int, ...]]]] = {"resnet18": resnet18_shapes, "gpt2_124m": gpt2_shapes}
MODES = {
    "triton": {"chunk": 1024, "split_tails": True, "by_dtype": True, "keep_empty": True},
    "cuda": {"chunk": 8192, "codes": _table.CUDA_CODES, "pointer_operands": (12,)},
}


def _fake(shapes: list[tuple[int, ...]]) -> list[Tensor]:
    return [torch.empty(1).expand(s) for s in shapes]


def _operands(shapes: list[tuple[int, ...]]) -> tuple[list, Callable[[], list]]:
    params, m, v = _fake(shapes), _fake(shapes), _fake(shapes)
    steps = [torch.zeros(()) for _ in shapes]

    def ops() -> list:
        return combine_operands(params, None, [_fake(shapes)], None, [m, v], None, None, steps)

    return ops(), ops


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(model: str, backend: str, repeats: int = 20) -> dict:
    """One row: ``miss`` / ``hit`` / ``moved`` median ms for ``model``'s shapes on ``backend``."""
    shapes = SHAPES[model]()
    first, fresh = _operands(shapes)
    kw = dict(MODES[backend], dynamic=TABLES["combine_step"].dynamic)
    dev = torch.device("cpu")

    def miss() -> None:
        _table.clear_cache()
        _table.get("bench", first, dev, **kw)

    moved_sets = [fresh() for _ in range(repeats)]
    it = iter(moved_sets)
    row = {"model": model, "backend": backend, "tensors": len(shapes), "elements": sum(x.numel() for x in first[0])}
    row["miss_ms"] = _median_ms(miss, repeats)
    row["hit_ms"] = _median_ms(lambda: _table.get("bench", first, dev, **kw), repeats)
    row["moved_ms"] = _median_ms(lambda: _table.get("bench", next(it), dev, **kw), repeats)
    parts = _table.get("bench", first, dev, **kw).parts
    row["table_int64s"] = sum(p.tab.numel() for p in parts if p.tab is not None)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastclu.bench.tables", description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    p.add_argument("--backends", default="triton,cuda", help="comma list of triton, cuda")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args(argv)
    models, backends = args.models.split(","), args.backends.split(",")
    bad = [m for m in models if m not in SHAPES] + [b for b in backends if b not in MODES]
    if bad or args.repeats < 1:
        print(f"fastclu.bench.tables: unknown {bad} (or --repeats < 1)", file=sys.stderr)
        return 2
    rows = [measure(m, b, args.repeats) for m in models for b in backends]
    print(f"{'model':<10} {'backend':<7} {'tensors':>7} {'miss ms':>8} {'hit ms':>7} {'moved ms':>8} {'int64s':>7}")
    for r in rows:
        print(f"{r['model']:<10} {r['backend']:<7} {r['tensors']:>7} {r['miss_ms']:>8.3f} {r['hit_ms']:>7.3f} "
              f"{r['moved_ms']:>8.3f} {r['table_int64s']:>7}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "command": "python -m fastclu.bench.tables " + " ".join(argv or sys.argv[1:])}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
